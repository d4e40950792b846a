"""One box as a token automaton: the format's fixed runs and four numbers, then ``<|im_end|>``.

The fixed parts of the answer are forced token by token and only the numbers are chosen by the
model, each digit restricted to values that keep the number valid (the format's spelling rules,
:meth:`~bbox_sft.formats.AnswerFormat.number_options`) and the box ordered and non-degenerate (each
max above the min already written). Parse rate is 1.0 by construction. It needs a tokenizer that
writes each digit as its own token, as Qwen's does; the grammar checks that and refuses otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..formats import DIGITS, AnswerFormat, get_format
from .base import TokenGrammar

# Boxes the grammar must write exactly as training wrote them (checked against the tokenizer at start-up).
SAMPLE_BOXES = ((0.0, 0.05, 0.5, 1.0), (0.13, 0.22, 0.54, 0.78))


class BoxGrammar(TokenGrammar):
    """A single box in ``answer_format`` (a name or an :class:`~bbox_sft.formats.AnswerFormat`)."""

    def __init__(self, tokenizer, answer_format: str | AnswerFormat = "json") -> None:
        self.format = get_format(answer_format)
        self.answer_format = self.format.name
        self._options: dict[tuple[str, int, int], tuple[list[int], bool]] = {}
        self.encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        self.fixed = [self.encode(s) for s in self.format.box_pieces(SAMPLE_BOXES[1])[0::2]]
        self.digit = {}
        for d in DIGITS:
            ids = self.encode(d)
            if len(ids) != 1:
                raise ValueError(f"constrained decoding needs one token per digit; {d!r} is {ids}")
            self.digit[d] = ids[0]
        self.char_of = {i: d for d, i in self.digit.items()}
        dot = self.encode(".")
        self.dot = dot[0] if len(dot) == 1 else None
        if "." in self.format.number(1) and self.dot is None:
            raise ValueError("constrained decoding needs '.' to be one token")
        if self.dot is not None:
            self.char_of[self.dot] = "."
        self.eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        for box in SAMPLE_BOXES:  # the grammar must write what training wrote
            text = self.format.box_text(box)
            if self.compose(box) != self.encode(text):
                raise ValueError(f"constrained decoding: this tokenizer splits {text!r} differently in context")

    def number_tokens(self, number: str) -> list[int]:
        """A written number as tokens: one per digit (and the decimal point)."""
        return [self.dot if c == "." else self.digit[c] for c in number]  # type: ignore[misc]

    def compose(self, box: Sequence[float]) -> list[int]:
        """Token ids of the answer for ``box`` as the automaton builds it (without eos)."""
        pieces = self.format.box_pieces(box)
        ids: list[int] = []
        for k, piece in enumerate(pieces):
            ids += self.fixed[k // 2] if k % 2 == 0 else self.number_tokens(piece)
        return ids

    @property
    def top(self) -> int:
        """The largest number on the answer's integer grid (1.00 is 100 hundredths in the json format)."""
        return self.format.top

    def bounds(self, index: int, values: Sequence[int]) -> tuple[int, int]:
        """Allowed range of number ``index`` given the numbers before it: each max above its min.

        x_min and y_min stop one unit below the top, so that a larger max exists; x_max and y_max lie
        strictly above the min already written.
        """
        if index < 2:
            return 0, self.top - 1
        return values[index - 2] + 1, self.top

    def number_options(self, chars: str, low: int, high: int) -> tuple[list[int], bool]:
        """(allowed next characters' tokens, whether the number may end here) for a number in [low, high].

        Memoised: a few thousand distinct arguments cover every answer, and decoding asks at every token.
        """
        key = (chars, low, high)
        if key not in self._options:
            if len(self._options) > 100_000:  # bounded over very long runs
                self._options.clear()
            following, may_end = self.format.number_options(chars, low, high)
            self._options[key] = [self.dot if c == "." else self.digit[c] for c in following], may_end
        return self._options[key]  # type: ignore[return-value]

    def allowed(self, generated: Sequence[int]) -> list[int]:
        """Tokens that may come next after ``generated`` (the answer so far)."""
        return self.state(generated)[0]

    def state(self, generated: Sequence[int]) -> tuple[list[int], int | None, str]:
        """(tokens that may come next, index of the number being written or None, its characters so far).

        The answer is fixed run 0, number 0, fixed run 1, ..., number 3, fixed run 4, then eos.
        """
        k, j, chars, in_number = 0, 0, "", False  # fixed run k, j of its tokens seen; or inside the number before it
        values: list[int] = []  # the numbers written so far, on the integer grid
        last = len(self.fixed) - 1
        for token in generated:
            if in_number:
                options, may_end = self.number_options(chars, *self.bounds(len(values), values))
                if token in options:
                    chars += self.char_of[token]
                    continue
                if not (may_end and token == self.fixed[k][0]):
                    return [self.eos], None, ""  # off the grammar: cannot happen under the processor
                in_number = False
                values.append(int(chars.replace(".", "")))
            elif token != self.fixed[k][j]:
                return [self.eos], None, ""
            j += 1
            if j == len(self.fixed[k]):
                if k == last:
                    return [self.eos], None, ""
                k, j, chars, in_number = k + 1, 0, "", True
        if in_number:
            options, may_end = self.number_options(chars, *self.bounds(len(values), values))
            return options + ([self.fixed[k][0]] if may_end else []), len(values), chars
        return [self.fixed[k][j]], None, ""
