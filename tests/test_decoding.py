"""Decoding: fast-forward of forced tokens, the box spread and its calibration, the native baseline parser,
and the grammar, collator and lengths checked against Qwen's real tokenizer."""

from __future__ import annotations

import copy
import math
import random

import datasets
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForImageTextToText, Qwen3VLForConditionalGeneration

import bbox_sft.decoding as decoding
from bbox_sft.calibration import Calibration, auroc, chance_ece, expected_calibration_error
from bbox_sft.collator import IGNORE_INDEX, BoxSFTCollator, add_lengths
from bbox_sft.decoding import ForcedTokenDecoder, generate_answers
from bbox_sft.formats import format_answer, parse_native_grounding, parse_objects
from bbox_sft.grammar import BoxGrammar as AnswerGrammar
from bbox_sft.grammar.lists import MAX_OBJECTS
from bbox_sft.model import set_pixel_budget
from bbox_sft.tasks.objects import INSTRUCTION as OBJECTS_INSTRUCTION
from bbox_sft.tiny import build_processor, build_qwen_tokenizer, tiny_config


def _images(box_dataset_dir, n: int = 6) -> list:
    split = datasets.load_from_disk(str(box_dataset_dir))
    return [image for name in ("validation", "test") for image in split[name]["image"]][:n]


class CountingForwards:
    """Counts the model's forward passes (the top module's ``forward``), per ``generate_answers`` batch."""

    def __init__(self, model) -> None:
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def _via_generate(monkeypatch, *args, **kwargs):
    """Today's path: transformers' ``generate`` with the grammar as a logits processor."""
    with monkeypatch.context() as m:
        m.setattr(ForcedTokenDecoder, "supports", classmethod(lambda cls, model: False))
        return generate_answers(*args, **kwargs)


@pytest.mark.parametrize("answer_format", ["json", "qwen"])
def test_fast_forward_writes_what_step_by_step_and_generate_write(answer_format, tiny_model_dir, box_dataset_dir,
                                                                   processor, monkeypatch) -> None:
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    images = _images(box_dataset_dir, 6)
    kwargs = dict(answer_format=answer_format, batch_size=3, progress=False)
    with CountingForwards(model) as fast_count:
        fast = generate_answers(model, processor, images, **kwargs)
    with CountingForwards(model) as slow_count:
        slow = generate_answers(model, processor, images, fast_forward=False, **kwargs)
    reference = _via_generate(monkeypatch, model, processor, images, **kwargs)
    assert [p.raw for p in fast] == [p.raw for p in slow] == [p.raw for p in reference]
    assert [p.box for p in fast] == [p.box for p in reference]
    for a, b, c in zip(fast, slow, reference):
        assert a.spread == pytest.approx(b.spread, abs=1e-5) and a.spread == pytest.approx(c.spread, abs=1e-5), (
            a.raw, a.spread, b.spread, c.spread)
    batches = 2
    if answer_format == "json":  # one prefill + one pass per choice step: at most 13 per batch
        assert fast_count.calls <= 13 * batches, fast_count.calls
    assert fast_count.calls < slow_count.calls  # never more passes than one token per pass


def _lists_on_some_rows(model, tokenizer) -> None:
    """Make an untrained model (which closes its list at once) write long lists on rows 0 and 2 of each
    batch: the scores of every token that closes something (contains "]") lowered there, in place."""
    closing = [i for i, t in enumerate(tokenizer.convert_ids_to_tokens(range(tokenizer.vocab_size))) if "]" in t]
    penalty = torch.zeros(model.config.text_config.vocab_size)
    penalty[closing] = -8.0

    def hook(module, args, kwargs, output):
        rows = [r for r in (0, 2) if r < output.logits.shape[0]]
        output.logits[rows] += penalty
        return output

    model.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize(("answer_format", "max_new_tokens"), [("json", 150), ("qwen", 1200)])
def test_fast_forward_writes_lists_as_generate_does_with_the_list_grammar(answer_format, max_new_tokens,
                                                                           tiny_model_dir, box_dataset_dir,
                                                                           processor, monkeypatch) -> None:
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    _lists_on_some_rows(model, processor.tokenizer)
    images = _images(box_dataset_dir, 6)
    # empty lists, lists cut short at 150 tokens (where generate cuts them), lists of max_objects items
    kwargs = dict(answer_format=answer_format, batch_size=3, progress=False, instruction=OBJECTS_INSTRUCTION,
                  parse=parse_objects, task="objects", labels=["cat", "dog", "traffic light"],
                  max_new_tokens=max_new_tokens)
    with CountingForwards(model) as fast_count:
        fast = generate_answers(model, processor, images, **kwargs)
    with CountingForwards(model) as reference_count:
        reference = _via_generate(monkeypatch, model, processor, images, **kwargs)
    assert [p.raw for p in fast] == [p.raw for p in reference]
    assert [p.objects for p in fast] == [p.objects for p in reference]
    for a, b in zip(fast, reference):
        assert a.object_scores == pytest.approx(b.object_scores, abs=1e-5), a.raw
    lengths = sorted(len(processor.tokenizer(p.raw)["input_ids"]) for p in fast)
    assert lengths[0] == 1 and (lengths[-1] == max_new_tokens if max_new_tokens == 150 else lengths[-1] < 1200)
    assert max(len(p.objects) for p in fast) == (3 if max_new_tokens == 150 else MAX_OBJECTS)
    assert fast_count.calls < reference_count.calls / 2  # measured: 78 against 300 (json), 576 against 1586


def test_each_json_pass_after_the_prefill_is_a_choice(tiny_model_dir, box_dataset_dir, processor) -> None:
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    grammar = AnswerGrammar(processor.tokenizer, "json")
    choices_seen = []
    choice = decoding._choice

    def spy(grammar_, state, logits):
        choices_seen.append(len(state[0]))
        return choice(grammar_, state, logits)

    decoding._choice = spy
    try:
        with CountingForwards(model) as count:
            generate_answers(model, processor, _images(box_dataset_dir, 1), batch_size=1, progress=False)
    finally:
        decoding._choice = choice
    # with one row every pass ends at a choice; the 10 digit choices of x_min.dd .. y_max (first digit of
    # a max: 0 or 1, then decimals; mins start with a forced 0) give 1 prefill + 9 passes, or fewer when a
    # max starts with 1 (its decimals are forced to 00)
    assert all(n > 1 for n in choices_seen)
    assert count.calls == len(choices_seen) <= 10
    assert grammar.forced([])[-2:] == [grammar.digit["0"], grammar.dot]  # the prefill carries "0."


# --- the box spread and its calibration --------------------------------------------------------


def test_spread_reads_the_digit_distributions() -> None:
    sure = [decoding.Choice(k, 1, [3, 4], [1.0, 0.0]) for k in range(4)]
    assert decoding.box_spread(sure, '{"x_min": 0.30, "y_min": 0.30, "x_max": 0.40, "y_max": 0.40}', "json") == 0
    torn = [decoding.Choice(0, 1, [3, 7], [0.5, 0.5])]  # x_min 0.3 or 0.7: std 0.2 on one coordinate
    raw = '{"x_min": 0.30, "y_min": 0.30, "x_max": 0.80, "y_max": 0.40}'
    assert decoding.box_spread(torn, raw, "json") == pytest.approx(0.2 / 4)
    qwen = [decoding.Choice(2, 0, [5, 6], [0.5, 0.5])]  # hundreds digit of a 3-digit number: std 50/1000
    assert decoding.box_spread(qwen, '{"bbox_2d": [10, 20, 550, 900]}', "qwen") == pytest.approx(0.05 / 4)


def test_calibration_recovers_a_known_relation() -> None:
    rng = np.random.default_rng(0)
    spreads = np.exp(rng.uniform(-6, -1, 4000))
    boxes = [(0.2, 0.1, 0.2 + w, 0.1 + h) for w, h in rng.uniform(0.05, 0.75, (4000, 2))]  # not square
    truth = lambda s, b: 1 / (1 + math.exp(-(-4.0 - 1.5 * math.log(s + 1e-4) + 0.5 * math.log(  # noqa: E731
        (b[2] - b[0]) * (b[3] - b[1])))))
    hits = [rng.random() < truth(s, b) for s, b in zip(spreads, boxes)]
    calibration = Calibration.fit(spreads, boxes, hits)
    assert calibration.coef[0] == pytest.approx(-1.5, abs=0.25) and calibration.coef[1] == pytest.approx(0.5, abs=0.25)
    from bbox_sft.calibration import features

    assert features(0.1, (0.1, 0.2, 0.5, 0.3))[1] == pytest.approx(math.log(0.4 * 0.1 + 1e-4))  # width x height
    probs = [calibration.probability(s, b) for s, b in zip(spreads, boxes)]
    assert expected_calibration_error(probs, hits) < 0.03
    assert auroc(probs, hits) == pytest.approx(auroc([truth(s, b) for s, b in zip(spreads, boxes)], hits), abs=0.01)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.booleans()), min_size=2, max_size=30))
def test_auroc_is_the_chance_a_hit_outranks_a_miss(pairs) -> None:
    scores, labels = [s for s, _ in pairs], [y for _, y in pairs]
    hits = [s for s, y in pairs if y]
    misses = [s for s, y in pairs if not y]
    area = auroc(scores, labels)
    if not hits or not misses:
        assert area is None
        return
    brute = sum((h > m) + 0.5 * (h == m) for h in hits for m in misses) / (len(hits) * len(misses))
    assert area == pytest.approx(brute)
    assert auroc([-s for s in scores], labels) == pytest.approx(1 - brute)


def test_ece_of_known_bins() -> None:
    assert expected_calibration_error([0.25] * 4, [True, False, False, False]) == pytest.approx(0.0)
    assert expected_calibration_error([0.95] * 10, [True] * 5 + [False] * 5) == pytest.approx(0.45)


@pytest.mark.parametrize(("n", "p"), [(4, 0.5), (15, 0.75), (40, 0.93)])
def test_chance_ece_of_one_bin_is_the_binomial_mean_deviation(n: int, p: float) -> None:
    exact = sum(math.comb(n, k) * p**k * (1 - p) ** (n - k) * abs(k / n - p) for k in range(n + 1))
    mean, p90 = chance_ece([p] * n, draws=20_000)
    assert mean == pytest.approx(exact, abs=0.005) and p90 > mean


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=40), st.integers(0, 2**16))
def test_chance_ece_is_the_ece_of_outcomes_drawn_from_the_confidence(probs, seed) -> None:
    outcomes = np.random.default_rng(seed).random((50, len(probs))) < np.asarray(probs)
    each = [expected_calibration_error(probs, list(row)) for row in outcomes]
    assert chance_ece(probs, draws=50, seed=seed) == pytest.approx((np.mean(each), np.quantile(each, 0.9)))


# --- the native grounding baseline's parser ----------------------------------------------------

FENCED = """```json
[
	{"bbox_2d": [102, 250, 611, 870], "label": "dog"},
	{"bbox_2d": [500, 50, 990, 990], "label": "person"}
]
```"""


@pytest.mark.parametrize("text, first, largest", [
    (FENCED, (0.102, 0.25, 0.611, 0.87), (0.5, 0.05, 0.99, 0.99)),
    ('{"bbox_2d": [100, 200, 300, 400], "label": "cat"}', (0.1, 0.2, 0.3, 0.4), (0.1, 0.2, 0.3, 0.4)),
    ('The main subject is here: [{"bbox_2d": [300, 400, 100, 200], "label": "the main subject"}]',
     (0.1, 0.2, 0.3, 0.4), (0.1, 0.2, 0.3, 0.4)),  # corners swapped
    ('```json\n[\n  {"bbox_2d": [0, 0, 1000, 500], "label": "a"},\n  {"bbox_2d": [10, 10, 3', (0, 0, 1, 0.5),
     (0, 0, 1, 0.5)),  # truncated mid-list
    ('[{"bbox_2d": [0, 0, 1200, 1000]}]', (0, 0, 1, 1), (0, 0, 1, 1)),  # past the grid: clamped
])
def test_native_answers_parse(text, first, largest) -> None:
    assert tuple(parse_native_grounding(text, "first")) == pytest.approx(first)
    assert tuple(parse_native_grounding(text, "largest")) == pytest.approx(largest)


@pytest.mark.parametrize("text", ["", "I cannot see a subject.", '{"bbox_2d": [1, 2, 3]}', '{"bbox_2d": [5, 5, 5, 9]}',
                                  '{"x_min": 0.1, "y_min": 0.1, "x_max": 0.5, "y_max": 0.5}', None])
def test_native_answers_without_a_box_give_none(text) -> None:
    assert parse_native_grounding(text) is None


# --- Qwen's real tokenizer ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_processor():
    """Qwen's real vocabulary and special-token ids, TRL's original Qwen3-VL template, Qwen's image settings."""
    tokenizer = build_qwen_tokenizer()
    assert tokenizer("Hello world")["input_ids"] == [9707, 1879]
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>",
            "<|vision_start|>", "<|image_pad|>", "<think>")] == [151643, 151644, 151645, 151652, 151655, 151667]
    processor = build_processor(tokenizer)
    set_pixel_budget(processor, 128, 160)
    return processor


box_strategy = st.tuples(*[st.floats(0, 1, allow_nan=False)] * 4).map(
    lambda v: (min(v[0], v[2]), min(v[1], v[3]), max(v[0], v[2]), max(v[1], v[3])))


@pytest.mark.parametrize("answer_format", ["json", "qwen"])
def test_grammar_composes_what_the_real_tokenizer_encodes(answer_format, qwen_processor) -> None:
    tokenizer = qwen_processor.tokenizer
    grammar = AnswerGrammar(tokenizer, answer_format)
    if answer_format == "json":
        assert len(tokenizer(format_answer((0.13, 0.22, 0.54, 0.78)))["input_ids"]) + 1 == 41  # + <|im_end|>

    @settings(max_examples=150, deadline=None)
    @given(box_strategy)
    def check(box) -> None:
        encoded = tokenizer(format_answer(box, answer_format), add_special_tokens=False)["input_ids"]
        assert grammar.compose(box) == encoded
        for t in range(len(encoded)):  # the automaton allows every token of it, then only <|im_end|>
            assert encoded[t] in grammar.allowed(encoded[:t]), (box, t)
        assert grammar.allowed(encoded) == [grammar.eos]

    check()


def _records(qwen_processor, n: int = 6) -> list[dict]:
    from PIL import Image

    from bbox_sft.chat import completion_messages, prompt_messages
    from bbox_sft.tasks.subject import INSTRUCTION

    rng = random.Random(0)
    records = []
    for _ in range(n):
        w, h = rng.randint(90, 300), rng.randint(90, 300)
        x0, x1 = sorted(rng.random() for _ in range(2))
        y0, y1 = sorted(rng.random() for _ in range(2))
        answer = format_answer((x0, y0, x1, y1), rng.choice(["json", "qwen"]))
        records.append({"image": Image.new("RGB", (w, h), (rng.randrange(256), 90, 40)), "width": w, "height": h,
                        "prompt": prompt_messages(INSTRUCTION), "completion": completion_messages(answer)})
    return records


def test_collator_and_lengths_with_the_real_tokenizer(qwen_processor) -> None:
    records = _records(qwen_processor)
    batch = BoxSFTCollator(qwen_processor)(copy.deepcopy(records))
    tokenizer = qwen_processor.tokenizer
    for row, record in zip(batch["labels"], records):
        kept = row[row != IGNORE_INDEX]
        answer = record["completion"][0]["content"][0]["text"]
        assert kept.tolist() == tokenizer(answer, add_special_tokens=False)["input_ids"] + [151645]
    table = datasets.Dataset.from_list([{k: r[k] for k in ("width", "height", "prompt", "completion")}
                                        for r in records])
    assert add_lengths(table, qwen_processor)["length"] == batch["attention_mask"].sum(1).tolist()


@pytest.mark.parametrize("answer_format", ["json", "qwen"])
def test_fast_forward_agrees_with_step_by_step_on_the_real_tokenizer(answer_format, qwen_processor, box_dataset_dir,
                                                                     monkeypatch) -> None:
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(tiny_config(qwen_processor.tokenizer, hidden_size=64, layers=1)).eval()
    images = _images(box_dataset_dir, 4)
    kwargs = dict(answer_format=answer_format, batch_size=2, progress=False)
    fast = generate_answers(model, qwen_processor, images, **kwargs)
    slow = generate_answers(model, qwen_processor, images, fast_forward=False, **kwargs)
    reference = _via_generate(monkeypatch, model, qwen_processor, images, **kwargs)
    assert [p.raw for p in fast] == [p.raw for p in slow] == [p.raw for p in reference]
    assert all(p.box is not None for p in fast)


def test_fast_forward_writes_lists_as_generate_does_on_the_real_tokenizer(qwen_processor, box_dataset_dir,
                                                                          monkeypatch) -> None:
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(tiny_config(qwen_processor.tokenizer, hidden_size=64, layers=1)).eval()
    _lists_on_some_rows(model, qwen_processor.tokenizer)
    kwargs = dict(batch_size=2, progress=False, instruction=OBJECTS_INSTRUCTION, parse=parse_objects, task="objects",
                  labels=["cat", "dog", "traffic light", "café"], max_new_tokens=200)
    images = _images(box_dataset_dir, 4)
    fast = generate_answers(model, qwen_processor, images, **kwargs)
    reference = _via_generate(monkeypatch, model, qwen_processor, images, **kwargs)
    assert [p.raw for p in fast] == [p.raw for p in reference]
    assert max(len(p.objects) for p in fast) >= 2
    for a, b in zip(fast, reference):
        assert a.object_scores == pytest.approx(b.object_scores, abs=1e-5), a.raw


# --- choices: ties and half precision ----------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 60), min_size=1, max_size=12, unique=True), st.data())
def test_a_choice_takes_the_best_option_and_the_lowest_id_among_equals(options, data) -> None:
    """As an argmax over the whole masked vocabulary (generate, vLLM): the first maximum in id order."""
    values = data.draw(st.lists(st.sampled_from([-1.5, 0.0, 0.25, 3.0]), min_size=len(options),
                                max_size=len(options)))
    scores = torch.full((64,), -7.0)
    scores[options] = torch.tensor(values)
    masked = torch.full((64,), float("-inf"))
    masked[options] = scores[options]
    assert decoding.pick(scores, options) == int(masked.argmax())


@pytest.mark.parametrize("answer_format", ["json", "qwen"])
def test_where_every_score_ties_each_engine_writes_the_lowest_allowed_id(answer_format, tiny_model_dir,
                                                                         box_dataset_dir, processor, monkeypatch):
    """All logits equal at every step: generate's argmax takes the lowest allowed token id each time, and so must
    fast-forward (in the qwen format ',' has a lower id than the digits: the grammar's option order is not it)."""
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)

    def flat(module, args, kwargs, output):
        output.logits.zero_()
        return output

    model.register_forward_hook(flat, with_kwargs=True)
    images = _images(box_dataset_dir, 3)
    kwargs = dict(answer_format=answer_format, batch_size=3, progress=False)
    fast = generate_answers(model, processor, images, **kwargs)
    assert [p.raw for p in fast] == [p.raw for p in _via_generate(monkeypatch, model, processor, images, **kwargs)]
    assert all(p.box is not None for p in fast)


def test_in_half_precision_choices_are_scored_in_fp32_from_the_last_hidden_state(tiny_model_dir, box_dataset_dir,
                                                                                  processor) -> None:
    """bf16 logits round nearby options onto one value; the decoder rescores the allowed tokens in fp32 from the
    hidden state the model's head reads: the same quantity (rounded to bf16 it is the model's logit, to one
    step of bf16) computed another way here (the last hidden state times the head's rows, in fp64)."""
    from bbox_sft.decoding import prompt_text
    from bbox_sft.tasks import get_task

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    grammar = AnswerGrammar(processor.tokenizer, "json")
    batch = processor(text=[prompt_text(processor, get_task("subject").instruction())] * 4,
                      images=[[image] for image in _images(box_dataset_dir, 4)], padding=True, padding_side="left",
                      return_tensors="pt")
    forced = torch.tensor([grammar.forced([])] * 4)  # up to the first digit of x_min: a choice among ten
    batch = {**batch, "input_ids": torch.cat([batch["input_ids"], forced], 1),
             "attention_mask": torch.cat([batch["attention_mask"], torch.ones_like(forced)], 1),
             "mm_token_type_ids": torch.cat([batch["mm_token_type_ids"], torch.zeros_like(forced)], 1)}
    decoder = ForcedTokenDecoder(model, grammar, processor.tokenizer.pad_token_id)
    assert decoder.head is model.lm_head
    logits = decoder._forward(**batch)
    hidden = model(**batch, output_hidden_states=True).hidden_states[-1][:, -1]
    options = grammar.allowed(grammar.forced([]))
    assert len(options) == 10  # the first digit of x_min
    for row in range(4):
        scores = decoder.scores(logits, row, options)[options]
        independent = (model.lm_head.weight[options].double() @ hidden[row].double()).float()
        assert torch.allclose(scores, independent, rtol=1e-5, atol=1e-5)
        ulp = (logits[row, options].float().abs() * 2**-7).clamp(min=2**-14)
        assert ((scores - logits[row, options].float()).abs() <= ulp).all()
        assert not torch.equal(scores, logits[row, options].float())  # finer than bf16's grid
