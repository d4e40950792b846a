"""Our answer grammar as a vLLM logits processor, loaded by the server: the same automaton as local decoding.

    vllm serve MODEL --logits-processors bbox_sft.grammar.vllm_processor:BoxGrammarLogitsProcessor     # GPUs
    vllm serve MODEL --logits-processors bbox_sft.grammar.vllm_processor:BoxGrammarLogitsProcessorV1   # CPUs

vLLM 0.32 has two model runners, and each loads only processors of its own interface: Model Runner V2
(wherever Triton works: every CUDA machine) takes :class:`BoxGrammarLogitsProcessor`, the V1 runner (vLLM's
CPU build) :class:`BoxGrammarLogitsProcessorV1`; ``bbox-sft serve`` names the one its vLLM runs. Both build
the grammar from the request's ``vllm_xargs`` (:class:`~bbox_sft.grammar.spec.GrammarSpec`), with the served
model's tokenizer, once per spec; a request without a spec is left alone. Per request, every token the
grammar does not allow after the answer so far is set to ``-inf`` before sampling, exactly as
:class:`~bbox_sft.decoding.GrammarLogitsProcessor` does for transformers' ``generate``.
This module imports vLLM: it runs inside the server's environment, never in the training one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcessor, LogitsProcRequestState

from .base import TokenGrammar
from .spec import GrammarSpec, mask_disallowed


class Grammars:
    """The grammar of each spec, built once with the served model's tokenizer."""

    def __init__(self, vllm_config) -> None:
        from transformers import AutoTokenizer

        config = vllm_config.model_config
        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer, revision=config.tokenizer_revision,
                                                       trust_remote_code=config.trust_remote_code)
        self.built: dict[GrammarSpec, TokenGrammar] = {}

    def of(self, params: SamplingParams) -> TokenGrammar | None:
        """The grammar a request asks for, or None when it asks for none."""
        spec = GrammarSpec.from_args(params.extra_args)
        if spec is None:
            return None
        if spec not in self.built:
            self.built[spec] = spec.build(self.tokenizer)
        return self.built[spec]


class BoxGrammarLogitsProcessor(LogitsProcessor):
    """Model Runner V2: per request slot, the grammar of the request that holds it; each step, every row of a
    slot with a grammar keeps only the tokens its grammar allows after that request's answer so far.

    The answer so far is read from the runner's own token history at every step (the committed output,
    ``all_token_ids[slot, prompt_len:total_len]``, and, for a speculative row, the draft tokens before it in
    ``input_ids``), so nothing here can fall out of step with the runner: rows reordered between steps, a
    slot recycled for another request, a request preempted and resumed with its partial answer as prefill.
    """

    def __init__(self, vllm_config, req_states: LogitsProcRequestState) -> None:
        self.req_states = req_states
        self.grammars = Grammars(vllm_config)
        self.slots: dict[int, TokenGrammar] = {}  # slot -> the grammar of the request in it

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        GrammarSpec.from_args(sampling_params.extra_args)  # a malformed spec: HTTP 400, the server stays up

    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        grammar = self.grammars.of(sampling_params)
        if grammar is None:
            self.slots.pop(req_idx, None)  # a recycled slot: its previous request's grammar goes with it
            return False
        self.slots[req_idx] = grammar
        return True

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        if not self.slots:
            return logits
        if len(ctx.expanded_idx_mapping) == len(ctx.idx_mapping_np):  # one row per request (no speculation)
            slots, local = ctx.idx_mapping_np.tolist(), [0] * len(ctx.idx_mapping_np)
        else:
            slots, local = ctx.expanded_idx_mapping.tolist(), ctx.expanded_local_pos.tolist()
        rows = [row for row, slot in enumerate(slots) if slot in self.slots]
        if not rows:
            return logits
        histories = self.histories(rows, [slots[r] for r in rows], [local[r] for r in rows], ctx)
        allowed = [self.slots[slots[row]].allowed(history) for row, history in zip(rows, histories)]
        return mask_rows(logits, rows, allowed)

    def histories(self, rows: list[int], slots: list[int], local: list[int], ctx: LogitsContext) -> list[list[int]]:
        """Each row's answer so far: its request's committed output, then the draft tokens fed before the row."""
        device = ctx.pos.device
        where = torch.tensor(rows, device=device)
        slot_index = torch.tensor(slots, device=device)
        seen, committed = torch.stack([ctx.pos[where].long() + 1,
                                       self.req_states.total_len.gpu[slot_index].long()]).cpu().tolist()
        prompt = self.req_states.prompt_len.np[slots].tolist()
        tokens = self.req_states.all_token_ids.gpu
        flat, spans = [], []
        for slot, start, end, total in zip(slots, prompt, seen, committed):
            stop = max(start, min(end, total))
            flat.extend(slot * tokens.stride(0) + p for p in range(start, stop))
            spans.append(stop - start)
        read = tokens.view(-1)[torch.tensor(flat, dtype=torch.long, device=tokens.device)].tolist() if flat else []
        drafts_needed = any(end > total for end, total in zip(seen, committed))
        drafts = ctx.input_ids.tolist() if drafts_needed else []
        histories, at = [], 0
        for row, pos_in_request, end, total, span in zip(rows, local, seen, committed, spans):
            history, at = read[at:at + span], at + span
            if end > total:  # input_ids at the request's first row is its last committed token; drafts follow
                first = row - pos_in_request
                history += drafts[first + 1:first + 1 + end - total]
            histories.append(history)
        return histories


def mask_rows(logits: torch.Tensor, rows: Sequence[int], allowed: Sequence[Sequence[int]]) -> torch.Tensor:
    """``logits`` with, in each of ``rows``, every token but its ``allowed`` ones at ``-inf`` (in place)."""
    row_index = torch.tensor([k for k, tokens in enumerate(allowed) for _ in tokens], device=logits.device)
    token_index = torch.tensor([t for tokens in allowed for t in tokens], device=logits.device)
    where = torch.tensor(list(rows), device=logits.device)
    masked = torch.full((len(rows), logits.shape[1]), float("-inf"), device=logits.device, dtype=logits.dtype)
    masked[row_index, token_index] = logits[where[row_index], token_index]
    logits[where] = masked
    return logits


class BoxGrammarLogitsProcessorV1(AdapterLogitsProcessor):
    """The V1 model runner (vLLM's CPU build): the same masks through vLLM's per-request adapter, which hands each
    request's function its output so far and its logits row."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        super().__init__(vllm_config, device, is_pin_memory)
        self.grammars = Grammars(vllm_config)

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        GrammarSpec.from_args(sampling_params.extra_args)

    def is_argmax_invariant(self) -> bool:
        return False  # it changes what greedy decoding picks

    def new_req_logits_processor(self, params: SamplingParams
                                 ) -> Callable[[list[int], torch.Tensor], torch.Tensor] | None:
        grammar = self.grammars.of(params)
        return None if grammar is None else partial(mask_disallowed, grammar)
