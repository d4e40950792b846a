"""The grammar a vLLM server builds from a request: the same automaton, the same mask, as local decoding."""

from __future__ import annotations

import json

import pytest
import torch

from bbox_sft.boxes import Box
from bbox_sft.formats import LabelledBox


@pytest.fixture(scope="module")
def qwen_tokenizer():
    from bbox_sft.tiny import build_qwen_tokenizer

    return build_qwen_tokenizer()


@pytest.mark.parametrize("task_name", ["subject", "objects", "phrase"])
@pytest.mark.parametrize("answer_format", ["json", "qwen"])
def test_a_spec_sent_as_json_builds_the_grammar_and_mask_local_decoding_uses(qwen_tokenizer, task_name,
                                                                            answer_format) -> None:
    from bbox_sft.decoding import GrammarLogitsProcessor
    from bbox_sft.grammar.spec import GrammarSpec, mask_disallowed
    from bbox_sft.tasks import get_task
    task, tokenizer = get_task(task_name), qwen_tokenizer
    labels, query = ["traffic light", "car", "person"], "car" if task_name == "phrase" else None
    spec = task.grammar_spec(answer_format, labels, query, 3)
    sent = GrammarSpec.from_args(json.loads(json.dumps(spec.to_args())))  # through an HTTP request's vllm_xargs
    assert sent == spec
    local, served = task.grammar(tokenizer, answer_format, labels, query, 3), sent.build(tokenizer)
    answer = [LabelledBox("car", Box(0.1, 0.2, 0.3, 0.4)), LabelledBox("car", Box(0.5, 0.1, 0.9, 0.7))]
    ids = local.compose(answer if task.answers_list else answer[0].box)
    assert served.compose(answer if task.answers_list else answer[0].box) == ids
    logits = torch.randn(len(tokenizer))
    processor = GrammarLogitsProcessor(local, prompt_length=0)
    for t in range(len(ids) + 1):
        expected = processor(torch.tensor([ids[:t]], dtype=torch.long), logits[None].clone())[0]
        got = mask_disallowed(served, ids[:t], logits.clone())
        assert torch.equal(got, expected), t  # the same tokens at -inf, the rest untouched


def test_a_malformed_spec_is_refused_and_a_request_without_one_is_left_alone() -> None:
    from bbox_sft.grammar.spec import GrammarSpec

    assert GrammarSpec.from_args(None) is None and GrammarSpec.from_args({"session_id": "x"}) is None
    for labels in ([], "car", [1, 2]):
        with pytest.raises(ValueError, match="bbox_labels must be a non-empty list of strings"):
            GrammarSpec.from_args({"bbox_format": "json", "bbox_labels": labels})
    with pytest.raises(ValueError, match="bbox_max_objects"):
        GrammarSpec.from_args({"bbox_format": "json", "bbox_labels": ["car"], "bbox_max_objects": 0})
    with pytest.raises(ValueError):
        GrammarSpec.from_args({"bbox_format": "yaml"})


@pytest.mark.parametrize("answer_format", ["json", "qwen"])
def test_a_list_bounded_at_one_object_builds_and_stops_after_one(qwen_tokenizer, answer_format: str) -> None:
    from bbox_sft.formats import get_format
    from bbox_sft.grammar.spec import GrammarSpec

    grammar = GrammarSpec(answer_format, ("car", "person"), max_objects=1).build(qwen_tokenizer)
    one = [LabelledBox("car", Box(0.1, 0.2, 0.5, 0.6))]
    ids = qwen_tokenizer.encode(get_format(answer_format).objects_text(one), add_special_tokens=False)
    assert all(token in grammar.allowed(ids[:t]) for t, token in enumerate(ids))
    assert grammar.allowed(ids) == [grammar.eos]  # a second object is not allowed: the list is closed
    two = qwen_tokenizer.encode(get_format(answer_format).objects_text(one * 2), add_special_tokens=False)
    assert any(token not in grammar.allowed(two[:t]) for t, token in enumerate(two))
