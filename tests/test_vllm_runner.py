"""The grammar inside vLLM's Model Runner V2, the runner every CUDA machine uses (``bbox-sft serve`` on GPUs).

The V2 runner needs Triton, which vLLM's CPU build disables, so a server here runs the V1 runner
(``tests/test_vllm.py``). What runs here of V2 is tested here: vLLM's loader and request validator take our V2
class (they refused the V1 one, so ``serve`` exited at startup on GPUs), and the class, driven through vLLM's own
``RequestState`` and ``LogitsContext`` (``tests/vllm_runner_replay.py``), masks exactly as local decoding and the
V1 processor do, at every step of answers the tiny models wrote (every task, both answer formats) and of
long ground-truth lists, with the batch shuffled, slots recycled, requests preempted and resumed, a request
without a grammar beside them and speculative rows.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = os.environ.get("BBOX_SFT_VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python")
QUERIES = ["the red star", "the small ellipse", "the triangle on the left", "the large rectangle"]


@pytest.fixture(scope="module")
def vllm_python() -> str:
    if not Path(VLLM_PYTHON).is_file():
        if os.environ.get("BBOX_SFT_VLLM_PYTHON"):
            pytest.fail(f"BBOX_SFT_VLLM_PYTHON={VLLM_PYTHON} does not exist")
        pytest.skip("no vLLM environment here: `make vllm` builds .venv-vllm (make test does)")
    return VLLM_PYTHON


def _steps(grammar, tokens: list[int], vocab: int) -> list[list[int]]:
    """What local decoding allows before each token of ``tokens``: the finite entries of the scores transformers'
    ``generate`` gets from our :class:`~bbox_sft.decoding.GrammarLogitsProcessor`."""
    from bbox_sft.decoding import GrammarLogitsProcessor

    processor = GrammarLogitsProcessor(grammar, 0)
    allowed = []
    for t in range(len(tokens)):
        scores = processor(torch.tensor([tokens[:t]], dtype=torch.long), torch.zeros(1, vocab))
        allowed.append(torch.isfinite(scores[0]).nonzero().flatten().tolist())
        assert tokens[t] in allowed[-1], "the recorded answer leaves the grammar"
    return allowed


@pytest.fixture(scope="module")
def recorded(adapter_dir: Path, objects_run: dict, synthetic_dir: Path, tmp_path_factory) -> Path:
    """Answers written by the tiny models under the grammar (subject and refer on the subject adapter, objects and
    phrase on the objects model; json and qwen each), and the longest ground-truth lists of the objects set."""
    from PIL import Image

    from bbox_sft.predict import BoxPredictor
    from bbox_sft.tasks import get_task

    images = [Image.open(p).convert("RGB") for p in sorted((synthetic_dir / "DUTS-TR" / "DUTS-TR-Image").glob(
        "*.jpg"))[:4]]
    boxes, lists = BoxPredictor.from_pretrained(adapter_dir), BoxPredictor.from_pretrained(objects_run["out"])
    labels, bound = lists.labels, lists.max_objects
    tokenizer = boxes.processor.tokenizer
    vocab = boxes.model.config.text_config.vocab_size
    cases = []
    for answer_format in ("json", "qwen"):
        asked = {"subject": (boxes, None), "refer": (boxes, QUERIES), "objects": (lists, None),
                 "phrase": (lists, [labels[i % len(labels)] for i in range(len(images))])}
        for name, (source, queries) in asked.items():
            task = get_task(name)
            predictor = BoxPredictor(source.model, source.processor, answer_format=answer_format, task=task,
                                     labels=labels if task.answers_list else None, max_objects=bound)
            for k, prediction in enumerate(predictor.predict(images, query=queries)):
                query = queries[k] if queries else None
                spec = task.grammar_spec(answer_format, labels, query, bound)
                grammar = spec.build(tokenizer)
                cases.append({"name": f"{name}/{answer_format}", "xargs": spec.to_args(), "tokens": prediction.tokens,
                              "allowed": _steps(grammar, prediction.tokens, vocab)})
        objects = get_task("objects")
        truths = sorted((objects.target(r) for r in objects_run["data"]["train"]), key=len)[-2:]
        spec = objects.grammar_spec(answer_format, labels, None, bound)
        grammar = spec.build(tokenizer)
        for truth in truths:
            tokens = [*grammar.compose(truth), grammar.eos]
            cases.append({"name": f"objects truth/{answer_format}", "xargs": spec.to_args(), "tokens": tokens,
                          "allowed": _steps(grammar, tokens, vocab)})
    path = tmp_path_factory.mktemp("recorded") / "recorded.json"
    tokenizer.save_pretrained(path.parent / "tokenizer")
    path.write_text(json.dumps({"tokenizer": str(path.parent / "tokenizer"), "vocab": vocab, "cases": cases}))
    return path


def test_the_v2_runner_loads_our_class_and_masks_as_local_decoding_and_v1(recorded: Path, vllm_python: str) -> None:
    from bbox_sft.serving import PROCESSORS

    cases = json.loads(recorded.read_text())["cases"]
    assert {c["name"] for c in cases} >= {f"{t}/{f}" for t in ("subject", "refer", "objects", "phrase")
                                          for f in ("json", "qwen")}
    assert max(len(c["tokens"]) for c in cases) > 100  # long lists among them
    run = subprocess.run([vllm_python, str(REPO / "tests" / "vllm_runner_replay.py"), str(recorded),
                          PROCESSORS["v2"], PROCESSORS["v1"]], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert run.returncode == 0 and lines, (run.stdout[-3000:], run.stderr[-3000:])
    summary = json.loads(lines[-1])
    assert "not a subclass" in summary["v2_loader_refuses_v1_class"]
    assert summary["answers"] == len(cases) + 2  # every recorded answer, and the two requests without a grammar
    assert summary["answers_by_case"] == {name: sum(c["name"] == name for c in cases) for name in
                                          {c["name"] for c in cases}} | {"no grammar": 2}
    for what in ("slots_reused", "preempted", "speculative_rows", "chunked_prefill_rows", "reordered_steps",
                 "rows_without_grammar", "no_grammar_in_a_recycled_slot"):
        assert summary[what] > 0, (what, summary)
