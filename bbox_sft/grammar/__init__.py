"""Constrained decoding: each answer format as a token automaton (one box, or a list of labelled boxes).

The automata read every layout from :mod:`bbox_sft.formats`; :mod:`bbox_sft.decoding` runs them.
"""

from .base import TokenGrammar
from .box import BoxGrammar
from .lists import ListGrammar

__all__ = ["BoxGrammar", "ListGrammar", "TokenGrammar"]
