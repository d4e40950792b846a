"""Constrained decoding for the list tasks: only well-formed lists of the dataset's labels can be written.

An answer of ``objects`` / ``phrase`` (:mod:`bbox_sft.objects`) is numbers joined by *connectors*:
the text between two numbers, or before the first and after the last. There are few of them:

- ``json``: ``[]`` or ``[{"label": "L", "x_min": `` to start; ``, "y_min": ``, ``, "x_max": ``,
  ``, "y_max": `` inside an item; ``}]`` or ``}, {"label": "L", "x_min": `` after it;
- ``qwen``: ``[]`` or ``[{"bbox_2d": [`` to start; ``, `` inside; ``], "label": "L"}]`` or
  ``], "label": "L"}, {"bbox_2d": [`` after it.

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

from .boxes import Box
from .decoding import AnswerGrammar, TokenGrammar
from .objects import MAX_OBJECTS, LabelledBox, format_objects, ordered
from .task import DECIMALS, grid_values


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

    def __init__(self, tokenizer, labels: Sequence[str], answer_format: str = "json",
                 max_objects: int = MAX_OBJECTS) -> None:
        if not labels:
            raise ValueError("constrained list decoding needs the dataset's labels")
        self.numbers = AnswerGrammar(tokenizer, answer_format)  # digits, the dot and the number rules
        self.answer_format, self.labels, self.max_objects = answer_format, sorted(set(labels)), max_objects
        self.eos = self.numbers.eos
        encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        names = {label: json.dumps(label, ensure_ascii=False) for label in self.labels}
        if answer_format == "json":
            head = {label: '{"label": ' + name + ', "x_min": ' for label, name in names.items()}
            start = [("[]", "eos")] + [("[" + head[label], "number") for label in self.labels]
            after = [("}]", "eos")] + [("}, " + head[label], "number") for label in self.labels]
            inner = [', "y_min": ', ', "x_max": ', ', "y_max": ']
            self.after_end = _trie([(encode("}]"), "eos")])
        else:
            start = [("[]", "eos"), ('[{"bbox_2d": [', "number")]
            tail = {label: '], "label": ' + name + "}" for label, name in names.items()}
            after = [(tail[label] + "]", "eos") for label in self.labels] + [
                (tail[label] + ', {"bbox_2d": [', "number") for label in self.labels]
            inner = [", ", ", ", ", "]
            self.after_end = _trie([(encode(tail[label] + "]"), "eos") for label in self.labels])
        self.start = _trie([(encode(text), then) for text, then in start])
        self.after = _trie([(encode(text), then) for text, then in after])
        self.inner = [_trie([(encode(text), "number")]) for text in inner]
        self._encode = encode
        self._states: dict[tuple[int, ...], _State | None] = {}
        for objects in self._samples():  # the automaton must write exactly what training wrote
            text = format_objects(objects, answer_format)
            ids = self.compose(objects)
            if ids != encode(text):
                raise ValueError(f"constrained decoding: this tokenizer splits {text!r} differently in context")
            if any(token not in self.allowed(ids[:t]) for t, token in enumerate(ids)) or self.allowed(ids) != [
                    self.eos]:
                raise ValueError(f"constrained decoding: the list grammar does not accept {text!r}")
        self._states.clear()

    def _samples(self) -> list[list[LabelledBox]]:
        a, b = self.labels[0], self.labels[-1]
        return [[], [LabelledBox(a, Box(0.13, 0.22, 0.54, 0.78))],
                [LabelledBox(a, Box(0.0, 0.05, 0.5, 1.0)), LabelledBox(b, Box(0.5, 0.1, 1.0, 0.37))]]

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
        return self.numbers._number_options(state.chars, *self._bounds(state))

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
        if key in self._states:
            return self._states[key]
        if not key:
            found: _State | None = self._initial()
        else:
            before = self.state_of(key[:-1])
            found = None if before is None else self.step(before, key[-1])
        if len(self._states) > 200_000:
            self._states.clear()
        self._states[key] = found
        return found

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

        A decision is a step where the grammar allowed more than one token: whether there is another
        object, its label, its digits. ``decisions[t]`` is the model's log-probability of the token
        written at step ``t`` among the allowed ones (:func:`~bbox_sft.decoding.decision_logprobs`).
        """
        logs: dict[int, list[float]] = {}
        for t in sorted(decisions):
            state = self.state_of(generated[:t])
            if state is None or state.ended:
                break
            # the connector after an item's numbers (qwen: its label) still belongs to that item
            item = state.items - 1 if state.closing and self.answer_format == "qwen" else state.items
            logs.setdefault(item, []).append(decisions[t])
        answer = list(generated[:-1] if generated and generated[-1] == self.eos else generated)
        written = self.state_of(answer)
        count = written.items if written is not None else max(logs, default=-1) + 1  # the "no more" choice: left out
        return [float(math.exp(sum(logs[k]) / len(logs[k]))) if logs.get(k) else 1.0 for k in range(count)]

    def state(self, generated: Sequence[int]) -> tuple[list[int], int | None, str]:
        """``AnswerGrammar.state``'s shape, for the decoding loop: no digit choices are scored here."""
        return self.allowed(generated), None, ""

    def compose(self, objects: Sequence[LabelledBox]) -> list[int]:
        """Token ids of the answer for ``objects`` as the automaton builds it (without eos)."""
        objects = ordered(objects, self.answer_format)
        encode = self._encode
        if not objects:
            return encode("[]")
        names = [json.dumps(o.label, ensure_ascii=False) for o in objects]
        top = self.numbers.top
        ids: list[int] = []
        for i, obj in enumerate(objects):
            if self.answer_format == "json":
                ids += encode(("[" if i == 0 else "}, ") + '{"label": ' + names[i] + ', "x_min": ')
                glue = [', "y_min": ', ', "x_max": ', ', "y_max": ']
            else:
                ids += encode('[{"bbox_2d": [' if i == 0 else '], "label": ' + names[i - 1] + '}, {"bbox_2d": [')
                glue = [", ", ", ", ", "]
            for k, value in enumerate(grid_values(obj.box, top)):
                number = f"{value / top:.{DECIMALS}f}" if self.answer_format == "json" else str(value)
                ids += [self.numbers.dot if c == "." else self.numbers.digit[c] for c in number]
                if k < 3:
                    ids += encode(glue[k])
        return ids + encode("}]" if self.answer_format == "json" else '], "label": ' + names[-1] + "}]")
