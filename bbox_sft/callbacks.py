"""Trainer callbacks a recipe names, and the time budget that lets two training methods be compared fairly."""

from __future__ import annotations

import logging
import time
from typing import Any

from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from transformers import EarlyStoppingCallback, TrainerCallback

logger = logging.getLogger(__name__)


class TimeBudgetCallback(TrainerCallback):
    """Stop training once ``seconds`` have passed since it began (its evaluations included), saving and
    evaluating that last step as at ``max_steps``: so the best-checkpoint choice and the final model see it. That
    step is logged too: the losses and rewards since the last log would otherwise never be reported (the end-of-run
    summary comes after the evaluation, which GRPO's trainer files its metrics under).

    Every process stops at the same step: the main process's clock decides and tells the others (ranks that
    stopped apart would wait on each other's collectives for ever).
    """

    def __init__(self, seconds: float) -> None:
        if seconds <= 0:
            raise ValueError(f"max_train_seconds must be > 0, got {seconds}")
        self.seconds = seconds
        self.start: float | None = None
        self.stopped_at: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        over = [time.perf_counter() - self.start >= self.seconds]
        if PartialState().num_processes > 1:
            over = broadcast_object_list(over, from_process=0)
        if over[0] and not control.should_training_stop:
            control.should_training_stop = True
            self.stopped_at = state.global_step
            if args.logging_strategy != "no":
                control.should_log = True
            if args.eval_strategy != "no":
                control.should_evaluate = True
            if args.save_strategy != "no":
                control.should_save = True
            logger.info("time budget of %.0f s reached at step %d: training stops", self.seconds, state.global_step)
        return control


CALLBACKS = {
    "early_stopping": lambda args: EarlyStoppingCallback(early_stopping_patience=args.early_stopping_patience),
}


def make_callbacks(names: list[str], script_args: Any) -> list[TrainerCallback]:
    """Callbacks listed by name in the recipe, and the time budget where the recipe sets one."""
    unknown = [n for n in names if n not in CALLBACKS]
    if unknown:
        raise ValueError(f"unknown callbacks {unknown}; known: {sorted(CALLBACKS)}")
    callbacks = [CALLBACKS[name](script_args) for name in names]
    if getattr(script_args, "max_train_seconds", None):
        callbacks.append(TimeBudgetCallback(script_args.max_train_seconds))
    return callbacks
