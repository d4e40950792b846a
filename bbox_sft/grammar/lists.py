"""Constrained decoding for the list tasks: only well-formed lists of the dataset's labels can be written.

A list answer (:meth:`~bbox_sft.formats.AnswerFormat.list_pieces`) is numbers joined by *connectors*:
the text between two numbers, or before the first and after the last. There are few of them, all
read from the answer format: the list's opening (``[]``, or ``[`` and the first item's head), the
text between an item's numbers, and after an item (its tail, then ``]`` or the separator and the
next item's head). Labels appear in the heads (json) or the tails (qwen).

Each connector is tokenized as a whole (a digit is always a token of its own, so the text around the
numbers tokenizes the same in context; checked at start-up on sample answers) and the connectors
that may come at a place form a token trie: the labels are the dataset's own, spelled as the
tokenizer spells them. Numbers follow the single-box grammar's rules (boxes at least one unit wide
and high) and, across items, ``x_min`` never decreases (the answers' order). After ``max_objects``
items only the closing connector is allowed, so every answer ends and parses.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..boxes import Box
from ..formats import LIST_CLOSE, LIST_OPEN, LIST_SEPARATOR, AnswerFormat, LabelledBox, get_format
from .base import TokenGrammar
from .box import BoxGrammar

MAX_OBJECTS = 20  # the bound of a run saved without its own (its longest training answer's count)


def _unique(texts: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """``texts`` without repeats, in first-seen order (a connector that does not depend on the label)."""
    return list(dict.fromkeys(texts))


@dataclass
class _Node:
    children: dict[int, _Node] = field(default_factory=dict)
    then: str | None = None  # at a complete connector: "number" (the next number) or "eos" (the answer ends)


def _trie(runs: Sequence[tuple[list[int], str]]) -> _Node:
    root = _Node()
    for tokens, then in runs:
        node = root
        for token in tokens:
            if node.then is not None:
                raise ValueError("constrained decoding: one connector's tokens are a prefix of another's")
            node = node.children.setdefault(token, _Node())
        if node.children or node.then is not None:
            raise ValueError("constrained decoding: one connector's tokens are a prefix of another's")
        node.then = then
    return root


@dataclass(frozen=True)
class _State:
    node: _Node | None  # inside a connector (None: inside a number)
    number: int  # which of the item's four numbers comes next or is being written
    chars: str  # the current number's characters so far
    values: tuple[int, ...]  # the current item's numbers so far, on the integer grid
    items: int  # items completed
    last_x_min: int  # the previous item's x_min (answers are ordered by x_min)
    ended: bool = False
    closing: bool = False  # inside the connector after an item's last number


class ListGrammar(TokenGrammar):
    """The list answer format as a token automaton over the dataset's ``labels``, then ``<|im_end|>``."""

    scores_decisions = True  # each object's score comes from the decisions that wrote it

    def __init__(self, tokenizer, labels: Sequence[str], answer_format: str | AnswerFormat = "json",
                 max_objects: int = MAX_OBJECTS) -> None:
        if not labels:
            raise ValueError("constrained list decoding needs the dataset's labels")
        self.format = get_format(answer_format)
        self.numbers = BoxGrammar(tokenizer, self.format)  # digits, the dot and the number rules
        self.answer_format, self.labels, self.max_objects = self.format.name, sorted(set(labels)), max_objects
        self.eos, self.char_of, self.dot = self.numbers.eos, self.numbers.char_of, self.numbers.dot
        encode = self.numbers.encode
        fmt, names = self.format, [json.dumps(label, ensure_ascii=False) for label in self.labels]
        start = _unique([(LIST_OPEN + LIST_CLOSE, "eos")] + [(LIST_OPEN + fmt.head(n), "number") for n in names])
        ends = _unique([(fmt.tail(n) + LIST_CLOSE, "eos") for n in names])
        after = ends + _unique([(fmt.tail(n) + LIST_SEPARATOR + fmt.head(m), "number") for n in names for m in names])
        self.start = _trie([(encode(text), then) for text, then in start])
        self.after = _trie([(encode(text), then) for text, then in after])
        self.after_end = _trie([(encode(text), then) for text, then in ends])
        self.inner = [_trie([(encode(text), "number")]) for text in fmt.inner]
        self._encode = encode
        self._states: dict[tuple[int, ...], _State | None] = {}
        for objects in self._samples():  # the automaton must write exactly what training wrote
            text = fmt.objects_text(objects)
            ids = self.compose(objects)
            if ids != encode(text):
                raise ValueError(f"constrained decoding: this tokenizer splits {text!r} differently in context")
            if any(token not in self.allowed(ids[:t]) for t, token in enumerate(ids)) or self.allowed(ids) != [
                    self.eos]:
                raise ValueError(f"constrained decoding: the list grammar does not accept {text!r}")
        self._states.clear()

    def _samples(self) -> list[list[LabelledBox]]:
        """Answers the grammar must write as training wrote them (none longer than its bound)."""
        a, b = self.labels[0], self.labels[-1]
        samples = [[], [LabelledBox(a, Box(0.13, 0.22, 0.54, 0.78))],
                   [LabelledBox(a, Box(0.0, 0.05, 0.5, 1.0)), LabelledBox(b, Box(0.5, 0.1, 1.0, 0.37))]]
        return [objects for objects in samples if len(objects) <= self.max_objects]

    # --- the automaton ---------------------------------------------------------------------------

    def _initial(self) -> _State:
        return _State(self.start, 0, "", (), 0, 0)

    def _bounds(self, state: _State) -> tuple[int, int]:
        low, high = self.numbers.bounds(state.number, state.values)
        return (max(low, state.last_x_min), high) if state.number == 0 else (low, high)

    def _after_connector(self, state: _State, node: _Node) -> _State:
        """The state once a connector is complete: a number to write, or the end."""
        if node.then == "eos":
            return _State(None, 0, "", (), state.items, state.last_x_min, ended=True)
        return _State(None, state.number, "", state.values, state.items, state.last_x_min)

    def _after_number(self, state: _State) -> _State:
        """The state once a number is complete: the connector that follows it."""
        values = (*state.values, int(state.chars.replace(".", "")))
        if len(values) < 4:
            return _State(self.inner[len(values) - 1], len(values), "", values, state.items, state.last_x_min)
        items = state.items + 1
        node = self.after_end if items >= self.max_objects else self.after
        return _State(node, 0, "", (), items, values[0], closing=True)

    def _options(self, state: _State) -> tuple[list[int], bool]:
        """(digit tokens allowed next, whether the number may end here) inside a number."""
        return self.numbers.number_options(state.chars, *self._bounds(state))

    def step(self, state: _State, token: int) -> _State | None:
        """The state after ``token``, or None if the grammar does not allow it."""
        if state.ended:
            return None
        if state.node is not None:
            child = state.node.children.get(token)
            if child is None:
                return None
            if child.then is not None:
                return self._after_connector(state, child)
            return _State(child, state.number, "", state.values, state.items, state.last_x_min,
                          closing=state.closing)
        digits, may_end = self._options(state)
        if token in digits:
            chars = state.chars + self.numbers.char_of[token]
            grown = _State(None, state.number, chars, state.values, state.items, state.last_x_min)
            more, _ = self._options(grown)
            return self._after_number(grown) if not more else grown  # json numbers end at their last digit
        if may_end:
            return self.step(self._after_number(state), token)
        return None

    def state_of(self, generated: Sequence[int]) -> _State | None:
        """The automaton's state after ``generated`` (memoised by prefix: decoding extends one token at a time)."""
        key = tuple(generated)
        start = len(key)
        while start > 0 and key[:start] not in self._states:  # the longest prefix already known
            start -= 1
        state = self._states[key[:start]] if start else self._initial()
        if len(self._states) > 200_000:
            self._states.clear()
        for t in range(start, len(key)):  # a loop, not recursion: a 40-object answer is ~1,500 tokens
            state = None if state is None else self.step(state, key[t])
            self._states[key[: t + 1]] = state
        return state

    def allowed(self, generated: Sequence[int]) -> list[int]:
        """Tokens that may come next after ``generated`` (the answer so far)."""
        state = self.state_of(generated)
        if state is None or state.ended:
            return [self.eos]
        if state.node is not None:
            return list(state.node.children)
        digits, may_end = self._options(state)
        if not may_end:
            return digits
        following = self._after_number(state).node  # the connector after the number (qwen: 1-4 digits)
        return digits + [t for t in following.children if t not in digits]

    def object_scores(self, generated: Sequence[int], decisions: Mapping[int, float]) -> list[float]:
        """Per written object, the geometric mean probability of the decisions that wrote it.

        A decision is a step where the grammar allowed more than one token. In json an object's decisions are
        that there is one more object and its label (they open it), then its digits; the final "no more" is
        left out. In qwen, where the label follows the numbers, they are its digits, then its label and whether
        another object follows. ``decisions[t]`` is the model's log-probability of the token written at step
        ``t`` among the allowed ones (:func:`~bbox_sft.decoding.decision_logprobs`).
        """
        logs: dict[int, list[float]] = {}
        for t in sorted(decisions):
            state = self.state_of(generated[:t])
            if state is None or state.ended:
                break
            # the connector after an item's numbers (qwen: its label) still belongs to that item
            item = state.items - 1 if state.closing and self.format.label_in_tail else state.items
            logs.setdefault(item, []).append(decisions[t])
        answer = list(generated[:-1] if generated and generated[-1] == self.eos else generated)
        written = self.state_of(answer)
        count = written.items if written is not None else max(logs, default=-1) + 1  # the "no more" choice: left out
        return [float(math.exp(sum(logs[k]) / len(logs[k]))) if logs.get(k) else 1.0 for k in range(count)]

    @property
    def max_tokens(self) -> int:
        """Tokens of the longest answer this grammar allows, ``<|im_end|>`` included: ``max_objects`` items of
        the longest-spelled label with the widest numbers. A ``max_new_tokens`` this large never cuts an answer."""
        widest = [Box(0.12, 0.12, 0.98, 0.98), Box(0.12, 0.12, 1.0, 1.0)]
        one = max(len(self.compose([LabelledBox(label, box)])) for label in self.labels for box in widest)
        more = max(len(self.compose([LabelledBox(label, box)] * 2)) for label in self.labels for box in widest) - one
        return one + more * (self.max_objects - 1) + 1

    def state(self, generated: Sequence[int]) -> tuple[list[int], int | None, str]:
        """``AnswerGrammar.state``'s shape, for the decoding loop: no digit choices are scored here."""
        return self.allowed(generated), None, ""

    def compose(self, objects: Sequence[LabelledBox]) -> list[int]:
        """Token ids of the answer for ``objects`` as the automaton builds it (without eos)."""
        ids: list[int] = []
        for k, piece in enumerate(self.format.list_pieces(objects)):
            ids += self._encode(piece) if k % 2 == 0 else self.numbers.number_tokens(piece)
        return ids
