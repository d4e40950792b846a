"""Our answer grammar as a vLLM logits processor, loaded by the server: the same automaton as local decoding.

    vllm serve MODEL --logits-processors bbox_sft.grammar.vllm_processor:BoxGrammarLogitsProcessor

Each request names its grammar in ``vllm_xargs`` (:class:`~bbox_sft.grammar.spec.GrammarSpec`); a
request without one is left alone. Per request, every token the grammar does not allow next is set
to ``-inf`` before sampling, exactly as :class:`~bbox_sft.decoding.GrammarLogitsProcessor` does for
transformers' ``generate``. Grammars are built once per spec with the served model's tokenizer.
This module imports vLLM: it runs inside the server's environment, never in the training one.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

from .base import TokenGrammar
from .spec import GrammarSpec, mask_disallowed


class BoxGrammarLogitsProcessor(AdapterLogitsProcessor):
    """Masks, per request, the tokens its :class:`GrammarSpec` does not allow after the answer so far."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        super().__init__(vllm_config, device, is_pin_memory)
        from transformers import AutoTokenizer

        config = vllm_config.model_config
        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer, revision=config.tokenizer_revision,
                                                       trust_remote_code=config.trust_remote_code)
        self.grammars: dict[GrammarSpec, TokenGrammar] = {}

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        GrammarSpec.from_args(sampling_params.extra_args)  # a malformed spec: HTTP 400, the server stays up

    def is_argmax_invariant(self) -> bool:
        return False  # it changes what greedy decoding picks

    def grammar(self, spec: GrammarSpec) -> TokenGrammar:
        if spec not in self.grammars:
            self.grammars[spec] = spec.build(self.tokenizer)
        return self.grammars[spec]

    def new_req_logits_processor(self, params: SamplingParams
                                 ) -> Callable[[list[int], torch.Tensor], torch.Tensor] | None:
        spec = GrammarSpec.from_args(params.extra_args)
        if spec is None:
            return None
        return partial(mask_disallowed, self.grammar(spec))
