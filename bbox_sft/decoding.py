"""Batched box generation, with optional constrained decoding and a confidence per box.

Constrained decoding makes the answer follow the answer format by construction: the fixed parts
of the JSON are forced token by token and only the numbers are chosen by the model, each digit
restricted to values that keep the number valid (``0.00``-``1.00`` in the json format, ``0``-``1000``
in the qwen format) and the box ordered and non-degenerate (each max above the min already written).
Parse rate is 1.0 by construction. It needs a tokenizer that writes each digit as its own token,
as Qwen's does; :class:`AnswerGrammar` checks that and refuses otherwise.

Images whose shape the processor refuses (aspect ratio over 200) are padded first and their boxes
mapped back to the original frame; ``raw`` keeps the answer as written for the padded image.

Generation uses left padding (right-padded batches make the model continue from pad tokens),
the KV cache, no gradient, eval mode, and puts the model back in training mode afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel, ProcessorMixin
from trl.data_utils import prepare_multimodal_messages

from .boxes import Box
from .images import pad_to_aspect_ratio, to_rgb
from .task import ANSWER_FORMATS, DECIMALS, JSON_KEYS, QWEN_GRID, QWEN_KEY, format_answer, parse_answer, prompt_messages

logger = logging.getLogger(__name__)
DIGITS = "0123456789"


@dataclass
class Prediction:
    """One generated answer: the box (``None`` if it did not parse), the raw text, and a confidence."""

    box: Box | None
    raw: str
    confidence: float


def _segments(answer_format: str) -> list[str]:
    """The fixed text around the four numbers."""
    if answer_format == "json":
        return ["{" + f'"{JSON_KEYS[0]}": ', *(f', "{k}": ' for k in JSON_KEYS[1:]), "}"]
    return ['{"' + QWEN_KEY + '": [', ", ", ", ", ", ", "]}"]


class AnswerGrammar:
    """The answer format as a token automaton: fixed token runs and four numbers, then ``<|im_end|>``."""

    def __init__(self, tokenizer, answer_format: str = "json") -> None:
        if answer_format not in ANSWER_FORMATS:
            raise ValueError(f"answer format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
        self.answer_format = answer_format
        encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        self.fixed = [encode(s) for s in _segments(answer_format)]
        self.digit = {}
        for d in DIGITS:
            ids = encode(d)
            if len(ids) != 1:
                raise ValueError(f"constrained decoding needs one token per digit; {d!r} is {ids}")
            self.digit[d] = ids[0]
        self.char_of = {i: d for d, i in self.digit.items()}
        dot = encode(".")
        self.dot = dot[0] if len(dot) == 1 else None
        if answer_format == "json" and self.dot is None:
            raise ValueError("constrained decoding needs '.' to be one token")
        if self.dot is not None:
            self.char_of[self.dot] = "."
        self.eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        for box in ((0.0, 0.05, 0.5, 1.0), (0.13, 0.22, 0.54, 0.78)):  # the grammar must write what training wrote
            text = format_answer(box, answer_format)
            if self.compose(box) != encode(text):
                raise ValueError(f"constrained decoding: this tokenizer splits {text!r} differently in context")

    def compose(self, box: Sequence[float]) -> list[int]:
        """Token ids of the answer for ``box`` as the automaton builds it (without eos)."""
        text = format_answer(box, self.answer_format)
        numbers = []
        rest = text
        for segment in _segments(self.answer_format)[:-1]:
            rest = rest[len(segment):]
            end = next(i for i, c in enumerate(rest) if c not in DIGITS + ".")
            numbers.append(rest[:end])
            rest = rest[end:]
        ids = []
        for fixed, number in zip(self.fixed, numbers):
            ids += fixed + [self.digit[c] if c in DIGITS else self.dot for c in number]
        return ids + self.fixed[-1]

    @property
    def top(self) -> int:
        """The largest number on the answer's integer grid (1.00 is 100 hundredths in the json format)."""
        return 10**DECIMALS if self.answer_format == "json" else QWEN_GRID

    def bounds(self, index: int, values: Sequence[int]) -> tuple[int, int]:
        """Allowed range of number ``index`` given the numbers before it: each max above its min.

        x_min and y_min stop one unit below the top, so that a larger max exists; x_max and y_max lie
        strictly above the min already written.
        """
        if index < 2:
            return 0, self.top - 1
        return values[index - 2] + 1, self.top

    def _feasible(self, digits: str, low: int, high: int) -> bool:
        """Whether a number that starts with ``digits`` can still end in [low, high]."""
        if self.answer_format == "json":  # exactly three digits, d.dd
            span = 10 ** (DECIMALS + 1 - len(digits))
            start = int(digits) * span
            return start <= high and start + span - 1 >= low
        if len(digits) > 1 and digits[0] == "0":  # qwen: 1-4 digits without leading zeros
            return False
        for extra in range(0, 5 - len(digits)) if digits != "0" else (0,):
            span = 10**extra
            start = int(digits) * span
            if start <= high and start + span - 1 >= low:
                return True
        return False

    def _number_options(self, chars: str, low: int, high: int) -> tuple[list[int], bool]:
        """(allowed next characters' tokens, whether the number may end here) for a number in [low, high]."""
        digits = chars.replace(".", "")
        if self.answer_format == "json":
            if len(chars) == 1:
                return [self.dot], False
            if len(digits) == DECIMALS + 1:
                return [], True
            return [self.digit[c] for c in DIGITS if self._feasible(digits + c, low, high)], False
        grows = len(digits) < 4 and digits != "0"
        options = [self.digit[c] for c in DIGITS if self._feasible(digits + c, low, high)] if grows else []
        return options, bool(digits) and low <= int(digits) <= high

    def allowed(self, generated: Sequence[int]) -> list[int]:
        """Tokens that may come next after ``generated`` (the answer so far).

        The answer is fixed run 0, number 0, fixed run 1, ..., number 3, fixed run 4, then eos.
        """
        k, j, chars, in_number = 0, 0, "", False  # fixed run k, j of its tokens seen; or inside the number before it
        values: list[int] = []  # the numbers written so far, on the integer grid
        last = len(self.fixed) - 1
        for token in generated:
            if in_number:
                options, may_end = self._number_options(chars, *self.bounds(len(values), values))
                if token in options:
                    chars += self.char_of[token]
                    continue
                if not (may_end and token == self.fixed[k][0]):
                    return [self.eos]  # off the grammar: cannot happen under the processor
                in_number = False
                values.append(int(chars.replace(".", "")))
            elif token != self.fixed[k][j]:
                return [self.eos]
            j += 1
            if j == len(self.fixed[k]):
                if k == last:
                    return [self.eos]
                k, j, chars, in_number = k + 1, 0, "", True
        if in_number:
            options, may_end = self._number_options(chars, *self.bounds(len(values), values))
            return options + ([self.fixed[k][0]] if may_end else [])
        return [self.fixed[k][j]]


class GrammarLogitsProcessor(LogitsProcessor):
    """Masks every token the grammar does not allow next (rows are left-padded prompts of equal length)."""

    def __init__(self, grammar: AnswerGrammar, prompt_length: int) -> None:
        self.grammar = grammar
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        mask = torch.full_like(scores, float("-inf"))
        for row, ids in enumerate(input_ids[:, self.prompt_length:].tolist()):
            mask[row, self.grammar.allowed(ids)] = 0.0
        return scores + mask


def prompt_text(processor: ProcessorMixin) -> str:
    """The chat-templated prompt, up to where the assistant starts answering."""
    messages = prepare_multimodal_messages(prompt_messages(), images=[None])
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _confidences(logits: Sequence[torch.Tensor], tokens: torch.Tensor, digit_ids: torch.Tensor) -> list[float]:
    """Per row: geometric mean probability (under the unconstrained model) of the digits it wrote.

    ``logits`` holds one (batch, vocab) tensor per generated step and ``tokens`` the (batch, steps)
    tokens written; the whole batch is scored at once.
    """
    stacked = torch.stack(tuple(logits), 1).float()  # (batch, steps, vocab)
    logp = stacked.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - stacked.logsumexp(-1)
    is_digit = torch.isin(tokens, digit_ids)
    counts = is_digit.sum(1)
    mean = (logp * is_digit).sum(1) / counts.clamp(min=1)
    return torch.where(counts > 0, mean.exp(), torch.zeros_like(mean)).tolist()


@torch.no_grad()
def generate_answers(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    images: Sequence[Image.Image],
    answer_format: str = "json",
    constrained: bool = True,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    progress: bool = True,
    synced_gpus: bool | None = None,
) -> list[Prediction]:
    """Greedy answers for ``images`` in batches of similar size; one :class:`Prediction` per image.

    ``synced_gpus`` (transformers' ``generate`` argument) keeps sharded ranks stepping together
    until all are done; None lets transformers decide.
    """
    tokenizer = processor.tokenizer
    grammar = AnswerGrammar(tokenizer, answer_format) if constrained else None
    digit_ids = torch.tensor([tokenizer.convert_tokens_to_ids(d) for d in DIGITS])
    text = prompt_text(processor)
    fitted = [pad_to_aspect_ratio(image) for image in images]  # shapes the processor refuses, padded
    order = sorted(range(len(images)), key=lambda i: fitted[i][0].size[0] * fitted[i][0].size[1])
    results: list[Prediction | None] = [None] * len(images)
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="Generating boxes", disable=not progress):
            index = order[start : start + batch_size]
            batch = processor(
                text=[text] * len(index),
                images=[[to_rgb(fitted[i][0])] for i in index],
                padding=True,
                padding_side="left",
                return_tensors="pt",
            ).to(model.device)
            prompt_length = batch["input_ids"].shape[1]
            processors = LogitsProcessorList([GrammarLogitsProcessor(grammar, prompt_length)]) if grammar else None
            out = model.generate(
                **batch,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                use_cache=True,
                logits_processor=processors,
                return_dict_in_generate=True,
                output_logits=True,
                eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                pad_token_id=tokenizer.pad_token_id,
                synced_gpus=synced_gpus,
            )
            written = out.sequences[:, prompt_length:]
            confidences = _confidences(out.logits, written, digit_ids.to(written.device))
            for row, i in enumerate(index):
                raw = tokenizer.decode(written[row], skip_special_tokens=True)
                box, letterbox = parse_answer(raw), fitted[i][1]
                if box is not None and letterbox is not None:
                    box = letterbox.to_original(box)
                results[i] = Prediction(box, raw, confidences[row])
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]
