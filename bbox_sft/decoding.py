"""Batched box generation, with optional constrained decoding and a confidence per box.

Constrained decoding makes the answer follow the answer format by construction: the fixed parts
of the JSON are forced token by token and only the numbers are chosen by the model, each digit
restricted to values that keep the number valid (``0.00``-``1.00`` in the json format, ``0``-``1000``
in the qwen format). Parse rate is 1.0 by construction. It needs a tokenizer that writes each
digit as its own token, as Qwen's does; :class:`AnswerGrammar` checks that and refuses otherwise.

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
from .task import ANSWER_FORMATS, JSON_KEYS, QWEN_KEY, format_answer, parse_answer, prompt_messages

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

    def _number_options(self, chars: str) -> tuple[list[int], bool]:
        """(allowed next characters' tokens, whether the number may end here)."""
        d = self.digit
        if self.answer_format == "json":  # exactly d.dd with value <= 1
            if chars == "":
                return [d["0"], d["1"]], False
            if len(chars) == 1:
                return [self.dot], False
            if len(chars) < 4:
                return ([d["0"]] if chars[0] == "1" else list(d.values())), False
            return [], True
        if chars == "":  # qwen: an integer 0..1000 without leading zeros
            return list(d.values()), False
        if chars == "0" or len(chars) == 4 or (len(chars) == 3 and chars != "100"):
            return [], True
        return ([d["0"]] if len(chars) == 3 else list(d.values())), True

    def allowed(self, generated: Sequence[int]) -> list[int]:
        """Tokens that may come next after ``generated`` (the answer so far).

        The answer is fixed run 0, number 0, fixed run 1, ..., number 3, fixed run 4, then eos.
        """
        k, j, chars, in_number = 0, 0, "", False  # fixed run k, j of its tokens seen; or inside the number before it
        last = len(self.fixed) - 1
        for token in generated:
            if in_number:
                options, may_end = self._number_options(chars)
                if token in options:
                    chars += self.char_of[token]
                    continue
                if not (may_end and token == self.fixed[k][0]):
                    return [self.eos]  # off the grammar: cannot happen under the processor
                in_number = False
            elif token != self.fixed[k][j]:
                return [self.eos]
            j += 1
            if j == len(self.fixed[k]):
                if k == last:
                    return [self.eos]
                k, j, chars, in_number = k + 1, 0, "", True
        if in_number:
            options, may_end = self._number_options(chars)
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
) -> list[Prediction]:
    """Greedy answers for ``images`` in batches of similar size; one :class:`Prediction` per image."""
    tokenizer = processor.tokenizer
    grammar = AnswerGrammar(tokenizer, answer_format) if constrained else None
    digit_ids = torch.tensor([tokenizer.convert_tokens_to_ids(d) for d in DIGITS])
    text = prompt_text(processor)
    order = sorted(range(len(images)), key=lambda i: images[i].size[0] * images[i].size[1])
    results: list[Prediction | None] = [None] * len(images)
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="Generating boxes", disable=not progress):
            index = order[start : start + batch_size]
            batch = processor(
                text=[text] * len(index),
                images=[[images[i].convert("RGB")] for i in index],
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
            )
            written = out.sequences[:, prompt_length:]
            confidences = _confidences(out.logits, written, digit_ids.to(written.device))
            for row, i in enumerate(index):
                raw = tokenizer.decode(written[row], skip_special_tokens=True)
                results[i] = Prediction(parse_answer(raw), raw, confidences[row])
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]
