"""Replays recorded answers through vLLM's Model Runner V2 interface, in vLLM's environment (no GPU needed).

    .venv-vllm/bin/python tests/vllm_runner_replay.py RECORDED.json V2_CLASS V1_CLASS

Run by ``tests/test_vllm_runner.py``. The V2 runner itself needs Triton (a GPU); everything around our processor
is vLLM's own code run here: its loader and request validator, its ``RequestState`` (slots from its free list,
``add_request`` / ``remove_request``, prompt and prefill lengths) and its ``LogitsContext``. What the runner's
Triton kernels do is done here in Python, as they do it: the staged writes of a new request's tokens, and after
each step the sampled token appended at ``total_len``. The batch is shuffled every step, finished requests free
their slots for the next ones, requests are preempted and resumed with their partial answer as prefill, a
request without a grammar rides along, and some steps are speculative (a draft token in ``input_ids``). At every
step each row's mask must allow exactly what local decoding allowed at that point of the recorded answer, keep
those logits as they were, and equal the V1 processor's mask; rows without a grammar must be left untouched.
Prints a JSON summary; exits 1 on the first difference.
"""

from __future__ import annotations

import json
import random
import sys
from types import SimpleNamespace

import numpy as np
import torch
import vllm.v1.worker.gpu.buffer_utils as buffer_utils

# vLLM counts a CPU platform as having UVA and pins host buffers; this environment's torch is a CUDA build, where
# pinning asks for a driver. Without UVA vLLM takes its explicit-copy buffers (NonUvaBuffer), as on any platform
# without pinned memory.
buffer_utils.is_uva_available = lambda: False

from vllm import SamplingParams  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402
from vllm.v1.sample.logits_processor import validate_logits_processors_parameters  # noqa: E402
from vllm.v1.worker.gpu.sample.logits_processor import (  # noqa: E402
    LogitsContext,
    build_custom_logits_processors,
    build_custom_logits_processors_params_validator,
)
from vllm.v1.worker.gpu.states import RequestState  # noqa: E402

SLOTS = 4


def fail(message: str) -> None:
    print(json.dumps({"error": message}))
    sys.exit(1)


def flush(tensor) -> None:
    """A ``StagedWriteTensor``'s staged writes, applied as its Triton kernel applies them (``_apply_write_kernel``)."""
    flat, start = tensor.gpu.view(-1), 0
    for index, begin, end in zip(tensor._staged_write_indices, tensor._staged_write_starts,
                                 tensor._staged_write_cu_lens):
        content = tensor._staged_write_contents[start:end]
        base = index * tensor.gpu.stride(0) + begin
        flat[base:base + len(content)] = torch.tensor(content, dtype=tensor.gpu.dtype)
        start = end
    tensor.clear_staged_writes()


def check_loaders(v2: str, v1: str) -> dict:
    """vLLM's own loaders: the V2 validator takes the V2 class and refuses the V1 one; both refuse a bad spec."""
    validate = build_custom_logits_processors_params_validator([v2])
    validate(SamplingParams(extra_args={"bbox_format": "json"}))
    validate(SamplingParams())  # no grammar asked: left alone
    try:
        validate(SamplingParams(extra_args={"bbox_format": "yaml"}))
        fail("the V2 validator took a malformed grammar spec")
    except VLLMValidationError:
        pass
    try:
        build_custom_logits_processors_params_validator([v1])
        fail("the V2 loader took the V1 class")
    except ValueError as error:
        refused = str(error)
    try:
        validate_logits_processors_parameters([v1], SamplingParams(extra_args={"bbox_format": "json",
                                                                                "bbox_labels": []}))
        fail("the V1 validator took a malformed grammar spec")
    except (ValueError, VLLMValidationError):
        pass
    return {"v2_loader_refuses_v1_class": refused}


class Runner:
    """What Model Runner V2 does around a logits processor, on the CPU: its request state and each step's batch."""

    def __init__(self, config, vocab: int, v2: str, v1: str) -> None:
        self.vocab = vocab
        self.states = RequestState(max_num_reqs=SLOTS, max_model_len=4096, max_num_batched_tokens=8192,
                                   num_speculative_steps=1, vocab_size=vocab, device=torch.device("cpu"),
                                   use_dense_all_token_ids=True)
        (self.processor,) = build_custom_logits_processors(config, self.states, False, [v2])
        module, name = v1.split(":")
        self.v1 = getattr(__import__(module, fromlist=[name]), name)(config, torch.device("cpu"), False)

    def add(self, req_id: str, prompt_len: int, tokens: list[int], params: SamplingParams) -> int:
        """A request enters the batch (new, or resumed with its partial answer in ``tokens``): its slot."""
        self.states.add_request(req_id, prompt_len, tokens, 0, 4096)
        slot = self.states.req_id_to_index[req_id]
        self.processor.add_request(slot, params)
        for tensor in (self.states.all_token_ids, self.states.total_len, self.states.num_computed_tokens):
            flush(tensor)
        self.states.prompt_len.copy_to_uva()
        self.states.prefill_len.copy_to_uva()
        return slot

    def committed(self, slot: int) -> list[int]:
        total = int(self.states.total_len.gpu[slot])
        return self.states.all_token_ids.gpu[slot, int(self.states.prompt_len.np[slot]):total].tolist()

    def append(self, slot: int, token: int) -> None:
        """The runner's post-update after sampling: the token at ``total_len``, which grows by one."""
        total = int(self.states.total_len.gpu[slot])
        self.states.all_token_ids.gpu[slot, total] = token
        self.states.total_len.gpu[slot] = total + 1


def main() -> None:
    recorded_path, v2, v1 = sys.argv[1:4]
    recorded = json.loads(open(recorded_path).read())
    summary = check_loaders(v2, v1)
    config = SimpleNamespace(model_config=SimpleNamespace(tokenizer=recorded["tokenizer"], tokenizer_revision=None,
                                                          trust_remote_code=False))
    runner = Runner(config, recorded["vocab"], v2, v1)
    rng = random.Random(0)
    torch.manual_seed(0)
    queue = [dict(case, n=i) for i, case in enumerate(recorded["cases"])]
    for at, n in ((1, -1), (len(queue) // 2, -2)):  # requests without a grammar: a fresh slot, then a recycled one
        queue.insert(at, {"name": "no grammar", "xargs": None, "n": n,
                          "tokens": [rng.randrange(recorded["vocab"]) for _ in range(30)]})
    active: dict[str, dict] = {}  # req id -> {case, slot, prompt, written}
    counts = dict(steps=0, rows=0, rows_without_grammar=0, slots_reused=0, preempted=0, speculative_rows=0,
                  chunked_prefill_rows=0, reordered_steps=0, answers=0, answers_by_case={},
                  no_grammar_in_a_recycled_slot=0)
    slots_seen: set[int] = set()
    order_before: list[str] = []
    while queue or active:
        while queue and len(active) < SLOTS - 1:  # one slot kept free for a resumed request
            case = queue.pop(0)
            req_id = f"r{case['n']}"
            prompt = [rng.randrange(recorded["vocab"]) for _ in range(rng.randint(5, 60))]
            params = SamplingParams(extra_args=case["xargs"]) if case["xargs"] else SamplingParams()
            slot = runner.add(req_id, len(prompt), prompt, params)
            counts["slots_reused"] += slot in slots_seen
            counts["no_grammar_in_a_recycled_slot"] += slot in slots_seen and not case["xargs"]
            slots_seen.add(slot)
            active[req_id] = dict(case=case, slot=slot, prompt=prompt, params=params, chunk=None)
        counts["steps"] += 1
        if counts["steps"] % 9 == 0:  # preempt one request mid-answer, resume it with its answer so far as prefill
            started = [r for r, a in active.items() if 2 <= len(runner.committed(a["slot"])) < len(a["case"]["tokens"])]
            if started:
                req_id = rng.choice(started)
                state = active[req_id]
                written = runner.committed(state["slot"])
                runner.states.remove_request(req_id)
                state["slot"] = runner.add(req_id, len(state["prompt"]), state["prompt"] + written, state["params"])
                # its prefill comes in two chunks: the first stops inside the partial answer, and its sampled token
                # is dropped (the runner samples a row for it all the same)
                state["chunk"] = len(state["prompt"]) + len(written) // 2
                counts["preempted"] += 1
        ids = list(active)
        rng.shuffle(ids)
        counts["reordered_steps"] += ids != [i for i in order_before if i in ids][: len(ids)]
        order_before = ids
        # every 4th step the first request's next token is fed as a draft: two rows for it
        speculate = ids[0] if counts["steps"] % 4 == 0 and active[ids[0]]["chunk"] is None else None
        rows: list[tuple[str, int]] = []  # (req id, local position)
        for req_id in ids:
            rows.append((req_id, 0))
            if req_id == speculate and len(runner.committed(active[req_id]["slot"])) + 1 < len(
                    active[req_id]["case"]["tokens"]):
                rows.append((req_id, 1))
        slots = [active[r]["slot"] for r, _ in rows]
        positions, inputs = [], []
        for req_id, local in rows:
            state = active[req_id]
            total = int(runner.states.total_len.gpu[state["slot"]])
            written = runner.committed(state["slot"])
            positions.append(total - 1 + local if state["chunk"] is None else state["chunk"] - 1)
            inputs.append(state["case"]["tokens"][len(written)] if local else int(
                runner.states.all_token_ids.gpu[state["slot"], total - 1]))
        per_request = [active[r]["slot"] for r in ids]
        ctx = LogitsContext(
            expanded_idx_mapping=torch.tensor(slots, dtype=torch.int32),
            idx_mapping=torch.tensor(per_request, dtype=torch.int32),
            idx_mapping_np=np.array(per_request, dtype=np.int32),
            expanded_local_pos=torch.tensor([local for _, local in rows], dtype=torch.int32),
            input_ids=torch.tensor(inputs, dtype=torch.int32),
            pos=torch.tensor(positions, dtype=torch.int64),
            seq_lens_upper_bound_np=np.array([p + 1 for p, (_, local) in zip(positions, rows) if local == 0]),
        )
        before = torch.randn(len(rows), recorded["vocab"])
        after = runner.processor.apply(before.clone(), ctx)
        for k, (req_id, local) in enumerate(rows):
            state = active[req_id]
            case, written = state["case"], runner.committed(state["slot"])
            if state["chunk"] is not None:  # a prefill chunk: the answer so far is what it has fed
                written = written[: state["chunk"] - len(state["prompt"])]
                counts["chunked_prefill_rows"] += 1
            at = len(written) + local
            counts["rows"] += 1
            counts["speculative_rows"] += local
            if case["xargs"] is None:
                counts["rows_without_grammar"] += 1
                if not torch.equal(after[k], before[k]):
                    fail(f"step {counts['steps']}: a request without a grammar had its logits changed")
                continue
            allowed = sorted(torch.isfinite(after[k]).nonzero().flatten().tolist())
            if allowed != sorted(case["allowed"][at]):
                fail(f"{case['name']} step {at}: V2 allows {allowed[:12]}, local decoding {case['allowed'][at][:12]}")
            if not torch.equal(after[k, allowed], before[k, allowed]):
                fail(f"{case['name']} step {at}: V2 changed the logits of allowed tokens")
            history = written + case["tokens"][len(written):at]
            one = runner.v1.new_req_logits_processor(active[req_id]["params"])(history, before[k].clone())
            if not torch.equal(torch.isfinite(one), torch.isfinite(after[k])) or not torch.equal(
                    one[allowed], after[k, allowed]):
                fail(f"{case['name']} step {at}: the V1 processor's mask differs from V2's")
        for req_id in ids:  # sample: each request writes its recorded next token
            state = active[req_id]
            if state["chunk"] is not None:  # mid-prefill: nothing written this step
                state["chunk"] = None
                continue
            written = runner.committed(state["slot"])
            runner.append(state["slot"], state["case"]["tokens"][len(written)])
            if len(written) + 1 == len(state["case"]["tokens"]):  # the answer is complete: the slot is freed
                runner.states.remove_request(req_id)
                del active[req_id]
                counts["answers"] += 1
                name = state["case"]["name"]
                counts["answers_by_case"][name] = counts["answers_by_case"].get(name, 0) + 1
    print(json.dumps({**summary, **counts}))


if __name__ == "__main__":
    main()
