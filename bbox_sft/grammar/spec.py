"""A grammar named by plain values, so another process (a vLLM server) builds the very same automaton.

A request to the server carries the spec in ``vllm_xargs``; :mod:`bbox_sft.grammar.vllm_processor`
builds the grammar from it with the served model's tokenizer. Both engines construct the same
:class:`~bbox_sft.grammar.box.BoxGrammar` or :class:`~bbox_sft.grammar.lists.ListGrammar` class:
there is no second copy of the rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..formats import get_format
from .base import TokenGrammar
from .box import BoxGrammar
from .lists import MAX_OBJECTS, ListGrammar

if TYPE_CHECKING:
    import torch

PREFIX = "bbox_"  # the keys of a spec among a request's extra arguments


@dataclass(frozen=True)
class GrammarSpec:
    """One box (``labels`` None) or a list of the given labels, in ``answer_format``, at most ``max_objects``."""

    answer_format: str = "json"
    labels: tuple[str, ...] | None = None
    max_objects: int = MAX_OBJECTS

    def build(self, tokenizer) -> TokenGrammar:
        if self.labels is None:
            return BoxGrammar(tokenizer, self.answer_format)
        return ListGrammar(tokenizer, list(self.labels), self.answer_format, self.max_objects)

    def to_args(self) -> dict[str, Any]:
        """The spec as request extra arguments (``vllm_xargs``: strings, numbers, lists)."""
        args: dict[str, Any] = {f"{PREFIX}format": self.answer_format}
        if self.labels is not None:
            args.update({f"{PREFIX}labels": list(self.labels), f"{PREFIX}max_objects": self.max_objects})
        return args

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> GrammarSpec | None:
        """The spec in a request's extra arguments, or None when the request asks for no grammar."""
        if not args or f"{PREFIX}format" not in args:
            return None
        labels = args.get(f"{PREFIX}labels")
        if labels is not None and not (isinstance(labels, list) and labels and all(isinstance(x, str) for x in labels)):
            raise ValueError(f"{PREFIX}labels must be a non-empty list of strings, got {labels!r}")
        max_objects = args.get(f"{PREFIX}max_objects", MAX_OBJECTS)
        if not isinstance(max_objects, int) or isinstance(max_objects, bool) or max_objects < 1:
            raise ValueError(f"{PREFIX}max_objects must be a whole number >= 1, got {max_objects!r}")
        return cls(get_format(str(args[f"{PREFIX}format"])).name, tuple(labels) if labels is not None else None,
                   max_objects)


def mask_disallowed(grammar: TokenGrammar, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
    """One request's next-token ``logits`` with every token ``grammar`` does not allow after ``output_ids`` at
    ``-inf`` (the vLLM processor's per-request step; :class:`~bbox_sft.decoding.GrammarLogitsProcessor` is the
    same for a transformers batch)."""
    import torch  # here, not at the top: what only builds a spec (synth, prepare, the client) needs no torch

    allowed = torch.tensor(grammar.allowed(output_ids), device=logits.device)
    masked = torch.full_like(logits, float("-inf"))
    masked[allowed] = logits[allowed]
    return masked
