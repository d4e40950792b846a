"""The SFT trainer: TRL's ``SFTTrainer`` with generation-based validation (:mod:`bbox_sft.validation`).

The loss is on the answer tokens only (:class:`~bbox_sft.collator.BoxSFTCollator`); at each evaluation the model also
writes boxes for the validation subset and the task scores them, so the best checkpoint is picked by the task's
metric. :class:`~bbox_sft.grpo_trainer.BoxGRPOTrainer` is the same validation on TRL's ``GRPOTrainer``.
"""

from __future__ import annotations

from trl import SFTTrainer

from .validation import GenerationValidation


class BoxSFTTrainer(GenerationValidation, SFTTrainer):
    """``SFTTrainer`` + box metrics from generation on the validation split (:class:`GenerationValidation`)."""
