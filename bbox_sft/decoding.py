"""Batched box generation, with optional constrained decoding and a confidence per box.

Constrained decoding makes the answer follow the answer format by construction: the fixed parts
of the JSON are forced token by token and only the numbers are chosen by the model, each digit
restricted to values that keep the number valid (``0.00``-``1.00`` in the json format, ``0``-``1000``
in the qwen format) and the box ordered and non-degenerate (each max above the min already written).
Parse rate is 1.0 by construction. It needs a tokenizer that writes each digit as its own token,
as Qwen's does; :class:`~bbox_sft.grammar.BoxGrammar` checks that and refuses otherwise.

Images whose shape the processor refuses (aspect ratio over 200) are padded first and their boxes
mapped back to the original frame; ``raw`` keeps the answer as written for the padded image.

Generation uses left padding (right-padded batches make the model continue from pad tokens),
the KV cache, no gradient, eval mode, and puts the model back in training mode afterwards.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList, PreTrainedModel, ProcessorMixin
from trl.data_utils import prepare_multimodal_messages

from .boxes import Box
from .chat import prompt_messages
from .formats import AnswerFormat, LabelledBox, get_format
from .grammar import TokenGrammar
from .images import pad_to_aspect_ratio, to_rgb

if TYPE_CHECKING:
    from .calibration import Calibration
    from .tasks import Task

logger = logging.getLogger(__name__)


@dataclass
class Prediction:
    """One generated answer.

    ``box`` is ``None`` if the answer did not parse; ``raw`` is the text as written; ``spread`` the
    box's uncertainty from the digit distributions (:func:`box_spread`, constrained decoding only);
    ``confidence`` the calibrated probability that the box has IoU >= 0.5 with the truth, when the
    model carries a calibration (:mod:`bbox_sft.calibration`). For the list tasks (``objects``,
    ``phrase``) ``box`` stays ``None`` and ``objects`` holds the labelled boxes read from the answer.
    """

    box: Box | None
    raw: str
    spread: float | None = None
    confidence: float | None = None
    objects: list[LabelledBox] | None = None
    object_scores: list[float] | None = None  # per object, under the list grammar (ListGrammar.object_scores)
    tokens: list[int] | None = None  # the answer's token ids as written (eos included where it was written)


class GrammarLogitsProcessor(LogitsProcessor):
    """Masks every token the grammar does not allow next (rows are left-padded prompts of equal length)."""

    def __init__(self, grammar: TokenGrammar, prompt_length: int) -> None:
        self.grammar = grammar
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        mask = torch.full_like(scores, float("-inf"))
        for row, ids in enumerate(input_ids[:, self.prompt_length:].tolist()):
            mask[row, self.grammar.allowed(ids)] = 0.0
        return scores + mask


def prompt_text(processor: ProcessorMixin, instruction: str) -> str:
    """The chat-templated prompt, up to where the assistant starts answering."""
    messages = prepare_multimodal_messages(prompt_messages(instruction), images=[None])
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@dataclass
class Choice:
    """One step where the grammar allowed more than one digit: what the model thought of each."""

    number: int  # which of the four numbers
    position: int  # digit index within that number
    digits: list[int]  # the allowed digits (values 0-9)
    probs: list[float]  # the model's probabilities of those digits, renormalised over them


def box_spread(choices: Sequence[Choice], raw: str, answer_format: str | AnswerFormat) -> float | None:
    """Mean standard deviation of the four coordinates implied by the digit distributions, in [0, 1] units.

    Each choice is a digit with a known place value (units, tenths, hundredths of the image in the json
    format; the qwen format's place follows from the number's final length): its variance under the
    model's distribution, scaled by that place, adds to its coordinate's variance. A model sure of every
    digit gives 0; one torn between 0.3 and 0.7 for x_min gives about 0.2 for that coordinate.
    """
    numbers = [n.replace(".", "") for n in re.findall(r"\d+(?:\.\d+)?", raw)][-4:]  # after "bbox_2d"
    if len(numbers) != 4:
        return None
    scale = get_format(answer_format).top
    variance = [0.0] * 4
    for c in choices:
        place = 10 ** (len(numbers[c.number]) - 1 - c.position) / scale
        # a qwen number's first digit is chosen before its length is known: an option that would pass the
        # grid's end at this length stands for the end (so a coordinate's spread stays within [0, 0.5])
        values = [min(d * place, 1.0) for d in c.digits]
        mean = sum(p * v for p, v in zip(c.probs, values)) / sum(c.probs)
        variance[c.number] += sum(p * (v - mean) ** 2 for p, v in zip(c.probs, values)) / sum(c.probs)
    return sum(v**0.5 for v in variance) / 4


def decision_logprobs(grammar: TokenGrammar, generated: Sequence[int], logits: Sequence[torch.Tensor]
                      ) -> dict[int, float]:
    """{step: log-probability of the token written there among the allowed ones}, at each step of
    ``generated`` where the grammar allowed more than one token (``logits[t]`` are step ``t``'s scores)."""
    decisions = {}
    for t, token in enumerate(generated[: len(logits)]):
        options = grammar.allowed(generated[:t])
        if len(options) > 1 and token in options:
            decisions[t] = _logprob(logits[t], options, token)
    return decisions


def _logprob(logits: torch.Tensor, options: list[int], token: int) -> float:
    """log P(``token``) under ``logits`` renormalised over the allowed ``options``."""
    return float(logits.float()[options].log_softmax(-1)[options.index(token)])


def _choice(grammar: TokenGrammar, state: tuple[list[int], int | None, str], logits: torch.Tensor) -> Choice | None:
    """The :class:`Choice` at a step in grammar ``state``, or None where it left no choice between digits."""
    options, number, chars = state
    if number is None:  # a fixed run, or a grammar that scores no digits (the list grammar)
        return None
    digits = [t for t in options if t in grammar.char_of and t != grammar.dot]
    if len(digits) < 2:
        return None
    probs = logits.float()[digits].softmax(-1).tolist()
    return Choice(number, len(chars.replace(".", "")), [int(grammar.char_of[t]) for t in digits], probs)


def pick(scores: torch.Tensor, options: Sequence[int]) -> int:
    """The option with the highest score; among equal scores the lowest token id, as an argmax over the whole
    vocabulary takes it (``generate``, vLLM)."""
    values = scores[list(options)].tolist()
    best = max(values)
    return min(token for token, value in zip(options, values) if value == best)


def sample(scores: torch.Tensor, options: Sequence[int], temperature: float,
           generator: torch.Generator | None = None) -> tuple[int, float]:
    """An option drawn from the softmax of its scores over ``temperature``, and its log-probability there: the
    policy renormalised over what the grammar allows (a forced token, the only option, has probability 1)."""
    logps = (scores[list(options)].float() / temperature).log_softmax(-1)
    k = int(torch.multinomial(logps.exp().cpu(), 1, generator=generator))
    return options[k], float(logps[k])


def _whole(weight: torch.Tensor) -> bool:
    """Whether ``weight`` is all here: not a DTensor shard (FSDP2), not a ZeRO-3 placeholder (empty)."""
    from torch.distributed.tensor import DTensor

    return not isinstance(weight, DTensor) and weight.numel() > 0


def _inner_model(model: PreTrainedModel) -> tuple[PreTrainedModel, torch.nn.Module | None]:
    """(the transformers model under peft / FSDP wrappers, its multimodal body if it has M-RoPE)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(base, "model", None)
    return base, body if hasattr(body, "get_rope_index") else None


class ForcedTokenDecoder:
    """Greedy constrained decoding that feeds every forced token run in one forward pass.

    ``model.generate`` spends one sequential decode step per token, yet in an answer most tokens are
    forced by the grammar (the keys, the punctuation, the decimal point, the first digit of a min; in
    a list, the connectors between numbers and the rest of a label once its first token is chosen).
    Here each forward pass takes, per row, the token just chosen plus the run the grammar forces
    after it, using the KV cache, so a batch costs one prefill plus one pass per choice step: in the
    json format, where all numbers have the same shape, rows stay aligned. Rows whose runs differ in
    length (the qwen format's 1-4 digit numbers, lists of different labels and lengths) feed the common
    length and keep the rest queued, so no row ever needs more passes than token-by-token decoding.
    Past ``max_new_tokens`` an answer is cut where ``generate`` cuts it. ``fast_forward=False`` feeds one
    token per pass: the same tokens, decoded the slow way (what tests compare against).

    Positions follow ``generate`` exactly: M-RoPE positions from the model's ``get_rope_index`` for
    the prompt, then one position per fed token.

    Each choice takes the allowed token with the highest score, the lowest token id among equals (as
    ``generate`` and vLLM, whose argmax runs over the vocabulary in id order). Where the model computes in
    bf16 or fp16, the allowed tokens' scores are recomputed in fp32 from the last hidden state (one row of the
    output embedding per allowed token, captured as the model computes its logits): half-precision logits round
    near-equal options onto the same value, where ``generate`` and vLLM then take the lowest id.
    """

    def __init__(self, model: PreTrainedModel, grammar: TokenGrammar | Sequence[TokenGrammar], pad_token_id: int,
                 fast_forward: bool = True, max_new_tokens: int = 64, synced_gpus: bool = False,
                 temperature: float = 0.0, generator: torch.Generator | None = None) -> None:
        self.model, self.grammar, self.pad = model, grammar, pad_token_id
        self.fast_forward, self.max_new_tokens, self.synced_gpus = fast_forward, max_new_tokens, synced_gpus
        # temperature > 0: each choice sampled among the allowed tokens (rollouts for reinforcement learning)
        self.temperature, self.generator = temperature, generator
        self.sampled_logps: list[dict[int, float]] = []  # per row, by step: the chosen token's log-probability
        self.base, self.body = _inner_model(model)
        params = inspect.signature(self.base.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        head = self.base.get_output_embeddings()
        # fp32 decisions where they are cheap: a plain linear head in half precision, its weight whole on this rank
        # (not an FSDP shard; under ZeRO-3 the generation context gathers it)
        self.head = head if type(head) is torch.nn.Linear and head.weight.dtype in (
            torch.bfloat16, torch.float16) and _whole(head.weight) else None
        self.hidden: torch.Tensor | None = None

    @classmethod
    def supports(cls, model: PreTrainedModel) -> bool:
        """Whether the model exposes the M-RoPE index this decoder needs (Qwen2-VL, 2.5-VL, 3-VL)."""
        return _inner_model(model)[1] is not None

    def _forward(self, **inputs) -> torch.Tensor:
        if self.head is None:
            return self.model(**inputs, use_cache=True, logits_to_keep=1).logits[:, -1]
        seen = self.head.register_forward_hook(lambda module, args, output: setattr(self, "hidden", args[0][:, -1]))
        try:
            return self.model(**inputs, use_cache=True, logits_to_keep=1).logits[:, -1]
        finally:
            seen.remove()

    def scores(self, logits: torch.Tensor, row: int, options: list[int]) -> torch.Tensor:
        """Row ``row``'s scores over the vocabulary, in fp32; the ``options``' own recomputed in fp32 from the last
        hidden state where the model computes in half precision."""
        scores = logits[row].float()
        if self.head is not None and self.hidden is not None:
            index = torch.tensor(options, device=scores.device)
            bias = self.head.bias[index].float() if self.head.bias is not None else None
            scores = scores.clone()
            scores[index] = torch.nn.functional.linear(self.hidden[row].float(), self.head.weight[index].float(), bias)
        return scores

    def decode(self, batch: dict[str, torch.Tensor]
               ) -> tuple[list[list[int]], list[list[Choice]], list[dict[int, float]]]:
        """Per row of a left-padded processor batch: the answer's tokens (eos included), the digit choices
        made, and, for a grammar that scores them, each decision's log-probability by step
        (:func:`decision_logprobs`)."""
        rows = batch["input_ids"].shape[0]
        grammars = list(self.grammar) if isinstance(self.grammar, (list, tuple)) else [self.grammar] * rows
        eos = grammars[0].eos
        device = batch["input_ids"].device
        written: list[list[int]] = [[] for _ in range(rows)]
        choices: list[list[Choice]] = [[] for _ in range(rows)]
        decisions: list[dict[int, float]] = [{} for _ in range(rows)]
        self.sampled_logps = [{} for _ in range(rows)]
        pending = [grammar.forced([]) for grammar in grammars]
        done = [False] * rows
        mask = batch["attention_mask"]
        rope, _ = self.body.get_rope_index(
            batch["input_ids"], image_grid_thw=batch.get("image_grid_thw"), attention_mask=mask,
            mm_token_type_ids=batch.get("mm_token_type_ids"))
        text = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        positions = torch.cat([text[None], rope], 0)  # generate's 4 rows: text, then M-RoPE t/h/w
        cache = DynamicCache(config=self.base.config)
        first, fed = True, 0
        inputs: dict[str, torch.Tensor] = {}
        while True:
            finished_here = all(done) or fed >= self.max_new_tokens
            if self.synced_gpus:  # every rank runs every pass until all ranks are done (sharded weights)
                flag = torch.tensor(0.0 if finished_here else 1.0, device=device)
                torch.distributed.all_reduce(flag)
                if flag.item() == 0.0:
                    break
            elif finished_here:
                break
            live = [r for r in range(rows) if not done[r]] or list(range(rows))
            if self.fast_forward and not first and not all(done) and all(
                    pending[r] and pending[r][-1] == eos for r in range(rows) if not done[r]):
                for r in range(rows):  # the rest of every answer is forced up to eos: no pass needed for it
                    if not done[r]:
                        written[r] += pending[r]
                        pending[r], done[r] = [], True
                continue
            if self.fast_forward:  # after the prefill at least one token (a rank done early feeds padding)
                n = min(len(pending[r]) for r in live) if first else max(1, min(len(pending[r]) for r in live))
            else:  # generate's way: the prompt alone, then one token per pass
                n = 0 if first else 1
            fed += n
            feed = [pending[r][:n] + [self.pad] * (n - len(pending[r][:n])) for r in range(rows)]
            for r in range(rows):
                if not done[r]:
                    written[r] += pending[r][:n]
                    pending[r] = pending[r][n:]
            ids = torch.tensor(feed, dtype=torch.long, device=device).reshape(rows, n)
            new = positions[..., -1:] + torch.arange(1, n + 1, device=device)
            if first:  # prefill: the prompt and the run forced before the first choice, in one pass
                positions = step = torch.cat([positions, new], -1)
                inputs = {**batch, "input_ids": torch.cat([batch["input_ids"], ids], 1),
                          "attention_mask": torch.cat([mask, torch.ones_like(ids)], 1)}
                first = False
            else:
                positions, step = torch.cat([positions, new], -1), new
                inputs = {"input_ids": ids, "attention_mask": torch.cat([inputs["attention_mask"],
                                                                         torch.ones_like(ids)], 1)}
            logits = self._forward(**inputs, position_ids=step, **{self.cache_arg: cache})
            for r in range(rows):
                if done[r] or pending[r]:
                    continue  # finished, or still has forced tokens queued: no choice to make here
                grammar = grammars[r]
                state = grammar.state(written[r])
                options = state[0]
                if len(options) == 1 and options[0] == eos:
                    written[r].append(eos)
                    done[r] = True
                    continue
                scores = self.scores(logits, r, options) if len(options) > 1 else logits[r]
                if self.temperature > 0:
                    token, self.sampled_logps[r][len(written[r])] = sample(scores, options, self.temperature,
                                                                          self.generator)
                else:
                    token = pick(scores, options)
                if grammar.scores_decisions and len(options) > 1:
                    decisions[r][len(written[r])] = _logprob(scores, options, token)
                choice = _choice(grammar, state, scores)
                if choice is not None:
                    choices[r].append(choice)
                pending[r] = [token, *grammar.forced([*written[r], token])]
                if pending[r][-1] == eos:  # the rest is forced to the end: no pass needed for it
                    written[r] += pending[r]
                    pending[r], done[r] = [], True
        # generate writes max_new_tokens tokens at most: the last pass's choice and forced run included
        written = [(w + p)[: self.max_new_tokens] for w, p in zip(written, pending)]
        return written, choices, [{t: v for t, v in d.items() if t < len(w)} for d, w in zip(decisions, written)]


@torch.no_grad()
def generate_answers(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    images: Sequence[Image.Image],
    answer_format: str | AnswerFormat = "json",
    constrained: bool = True,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    progress: bool = True,
    synced_gpus: bool | None = None,
    fast_forward: bool = True,
    calibration: Calibration | None = None,
    instruction: str | Sequence[str] | None = None,
    parse: Callable[[str], Box | list[LabelledBox] | None] | None = None,
    labels: Sequence[str] | None = None,
    task: str | Task = "subject",
    query: str | None = None,
    max_objects: int | None = None,
) -> list[Prediction]:
    """Greedy answers of ``task`` for ``images`` in batches of similar size; one :class:`Prediction` per image.

    The task gives the question (``instruction`` overrides it: one, or one per image), the parser
    (``parse`` overrides it: the native grounding baseline), the token budget and, with
    ``constrained``, the grammar (a list task's from ``labels``, or ``query`` for one that names its
    labels; ``max_objects`` bounds a list, and the token budget follows: a list grammar's longest answer).
    Constrained decoding runs :class:`ForcedTokenDecoder` (forced runs fed in one pass each;
    with ``fast_forward=False`` one token per pass) on models with M-RoPE, and transformers' ``generate``
    with the grammar as a logits processor otherwise; unconstrained decoding is ``generate``.
    ``synced_gpus`` keeps sharded ranks stepping together until all are done; None lets transformers
    decide. ``calibration`` turns each box's spread into P(IoU >= 0.5).
    """
    from .tasks import get_task

    task = get_task(task)
    answer_format = get_format(answer_format)
    instruction = task.instruction(query) if instruction is None else instruction
    parse = parse or task.parse
    tokenizer = processor.tokenizer
    grammar = task.grammar(tokenizer, answer_format, labels, query, max_objects) if constrained else None
    if max_new_tokens is None:  # unconstrained, a list gets the budget its grammar would give
        bounds = grammar if constrained or not task.answers_list else task.grammar(tokenizer, answer_format, labels,
                                                                                      query, max_objects)
        max_new_tokens = task.token_budget(bounds)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    use_decoder = grammar is not None and ForcedTokenDecoder.supports(model)
    asked = [instruction] * len(images) if isinstance(instruction, str) else list(instruction)
    if len(asked) != len(images):
        raise ValueError(f"{len(asked)} instructions for {len(images)} images")
    texts = {question: prompt_text(processor, question) for question in set(asked)}
    fitted = [pad_to_aspect_ratio(image) for image in images]  # shapes the processor refuses, padded
    order = sorted(range(len(images)), key=lambda i: fitted[i][0].size[0] * fitted[i][0].size[1])
    results: list[Prediction | None] = [None] * len(images)
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="Generating boxes", disable=not progress):
            index = order[start : start + batch_size]
            batch = processor(
                text=[texts[asked[i]] for i in index],
                images=[[to_rgb(fitted[i][0])] for i in index],
                padding=True,
                padding_side="left",
                return_tensors="pt",
            ).to(model.device)
            if use_decoder:
                decoder = ForcedTokenDecoder(model, grammar, tokenizer.pad_token_id, fast_forward=fast_forward,
                                             max_new_tokens=max_new_tokens, synced_gpus=bool(synced_gpus))
                written, choices, decisions = decoder.decode(batch)
            else:
                written, choices, decisions = _generate(model, batch, grammar, eos, tokenizer.pad_token_id,
                                                        max_new_tokens, synced_gpus)
            for row, i in enumerate(index):
                raw = tokenizer.decode(written[row], skip_special_tokens=True)
                results[i] = answer_of(raw, written[row], choices[row], decisions[row], grammar, fitted[i][1],
                                       parse, answer_format, calibration)
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def _generate(model: PreTrainedModel, batch, grammar: TokenGrammar | None, eos: int, pad: int, max_new_tokens: int,
              synced_gpus: bool | None) -> tuple[list[list[int]], list[list[Choice]], list[dict[int, float]]]:
    """transformers' ``generate``, one token per step, with the grammar as a logits processor if given."""
    prompt_length = batch["input_ids"].shape[1]
    processors = LogitsProcessorList([GrammarLogitsProcessor(grammar, prompt_length)]) if grammar else None
    out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens, use_cache=True,
                         logits_processor=processors, return_dict_in_generate=True, output_logits=True,
                         eos_token_id=eos, pad_token_id=pad, synced_gpus=synced_gpus)
    tokens = out.sequences[:, prompt_length:].tolist()
    written, choices, decisions = [], [], []
    for row, ids in enumerate(tokens):
        ids = ids[: ids.index(eos) + 1] if eos in ids else ids
        written.append(ids)
        if grammar is None:
            choices.append([])
            decisions.append({})
            continue
        logits = [out.logits[t][row] for t in range(len(ids))]
        mine, scored = scored_steps(grammar, ids, logits)
        choices.append(mine)
        decisions.append(scored)
    return written, choices, decisions


def scored_steps(grammar: TokenGrammar, ids: Sequence[int], logits: Sequence[torch.Tensor]
                 ) -> tuple[list[Choice], dict[int, float]]:
    """(the digit choices, the scored decisions) of an answer ``ids`` written under ``grammar``, from each
    step's scores (``logits[t]``: any scores whose softmax over the allowed tokens is the model's, such as
    transformers' logits or a server's log-probabilities after the grammar's mask)."""
    if grammar.scores_decisions:  # the list grammar: decisions scored, no digit choices
        return [], decision_logprobs(grammar, ids, logits)
    mine = [_choice(grammar, grammar.state(list(ids[:t])), logits[t]) for t in range(min(len(ids), len(logits)))]
    return [c for c in mine if c is not None], {}


def answer_of(raw: str, written: Sequence[int], choices: Sequence[Choice], decisions: dict[int, float],
              grammar: TokenGrammar | None, letterbox, parse: Callable[[str], Box | list[LabelledBox] | None],
              answer_format: str | AnswerFormat, calibration: Calibration | None) -> Prediction:
    """One :class:`Prediction` from an answer as written (text, tokens) and what the model thought at its
    choices: boxes mapped back from a padded image's frame, spread, confidence, per-object scores. Both
    engines (local decoding, a vLLM server) end here, so they report the same fields the same way."""
    box = parse(raw)
    if isinstance(box, list):  # a list task: every box back in the original frame
        objects = [o._replace(box=letterbox.to_original(o.box)) for o in box] if letterbox else box
        scored = grammar is not None and grammar.scores_decisions
        scores = grammar.object_scores(list(written), decisions) if scored else None
        if scores is not None and len(scores) != len(objects):  # cut short by max_new_tokens
            scores = (scores + [1.0] * len(objects))[: len(objects)]
        return Prediction(None, raw, objects=objects, object_scores=scores, tokens=list(written))
    if box is not None and letterbox is not None:
        box = letterbox.to_original(box)
    spread = box_spread(choices, raw, answer_format) if grammar is not None else None
    confidence = calibration.probability(spread, box) if calibration and box else None
    return Prediction(box, raw, spread, confidence, tokens=list(written))
