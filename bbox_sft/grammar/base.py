"""What every answer grammar is to the decoder: the tokens allowed next, and the runs it forces."""

from __future__ import annotations

from collections.abc import Sequence


class TokenGrammar:
    """An answer format as a token automaton: which tokens may follow the answer so far, up to ``eos``.

    Subclasses give :meth:`allowed` and :meth:`state`; :meth:`forced` (the run the automaton leaves no
    choice in) follows from them, and is all :class:`~bbox_sft.decoding.ForcedTokenDecoder` needs to
    skip decode steps. ``char_of`` maps the digit (and decimal point) tokens to their characters and
    ``dot`` is the decimal point's token, for reading digit choices.
    """

    eos: int
    char_of: dict[int, str]
    dot: int | None
    scores_decisions = False  # whether answers are scored by their decisions' log-probabilities (lists)

    def allowed(self, generated: Sequence[int]) -> list[int]:
        """Tokens that may come next after ``generated`` (the answer so far)."""
        raise NotImplementedError

    def state(self, generated: Sequence[int]) -> tuple[list[int], int | None, str]:
        """(tokens that may come next, index of the number being written or None, its characters so far)."""
        raise NotImplementedError

    def forced(self, generated: Sequence[int]) -> list[int]:
        """The tokens the grammar forces after ``generated``, up to the next choice (eos included)."""
        run: list[int] = []
        while True:
            options = self.allowed([*generated, *run])
            if len(options) != 1:
                return run
            run.append(options[0])
            if options[0] == self.eos:
                return run
