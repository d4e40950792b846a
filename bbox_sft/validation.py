"""Generation-based validation, shared by every trainer here: the model writes boxes, the task scores them.

Loss alone does not say whether the boxes are right. :class:`GenerationValidation` is a mixin for a TRL trainer
(:class:`~bbox_sft.trainer.BoxSFTTrainer`, :class:`~bbox_sft.grpo_trainer.BoxGRPOTrainer`) whose evaluation also
generates answers for (a fixed subset of) the validation split, greedy and constrained, and adds the task's metrics
(``eval_mean_iou``, ``eval_success@0.5``, ... for one box; ``eval_f1@0.5``, ``eval_map``, ... for lists) to the
metrics *before* they are logged. So ``report_to`` backends, ``metric_for_best_model: eval_mean_iou`` with
``load_best_model_at_end``, and early stopping all see them unchanged. (A ``TrainerCallback.on_evaluate`` runs
after the Trainer has logged, which is why this hooks ``evaluation_loop`` instead.)

Under DDP, FSDP and ZeRO-3 each rank generates an equal-size shard of the subset (under TRL's
``unwrap_model_for_generation``); the boxes are gathered once, put back in order, and every rank
computes the same metrics. A PNG grid of predictions (truth green, prediction red) is written per
evaluation under ``output_dir/validation/``. The same mixin calibrates the box confidence at the end of
training and writes the model card.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from accelerate.utils import gather_object
from trl.models import unwrap_model_for_generation

from .boxes import iou
from .calibration import Calibration, confidence_metrics, fit_from_predictions
from .chat import instruction_of
from .decoding import Prediction, generate_answers
from .hub import write_model_card
from .tasks import Task, get_task
from .visualize import image_grid, save_training_curves

logger = logging.getLogger(__name__)


class GenerationValidation:
    """A TRL trainer + box metrics from generation on the validation split (mix in before the trainer's class).

    Args (beyond the trainer's):
        box_eval_samples: size of the fixed validation subset generated at each evaluation (0: all).
        answer_format: the format the model was trained to write.
        constrained_decoding: force the answer format while generating (parse rate 1.0).
        grid_images: how many predictions the PNG grid shows.
    """

    def __init__(
        self,
        *args: Any,
        box_eval_samples: int = 64,
        answer_format: str = "json",
        constrained_decoding: bool = True,
        grid_images: int = 16,
        max_objects: int | None = None,
        labels: list[str] | None = None,
        task: str | Task = "subject",
        card_info: dict[str, Any] | None = None,
        final_eval_dataset=None,
        calibration_dataset=None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("args") is not None:  # the trainers here are built with keyword arguments
            reentrant_under_zero3(kwargs["args"], kwargs.get("peft_config") is not None or hasattr(
                kwargs.get("model"), "peft_config"))
        super().__init__(*args, **kwargs)
        self.calibration_dataset = calibration_dataset  # the validation split, for the box confidence
        self.calibration: Calibration | None = None
        self.final_eval_dataset = final_eval_dataset  # the test split, for do_eval after training
        self.box_eval_samples = box_eval_samples
        self.answer_format = answer_format
        self.constrained_decoding = constrained_decoding
        self.grid_images = grid_images
        self.max_objects = max_objects  # list tasks: the longest training answer bounds the answers
        self.labels = labels  # list tasks: the labels constrained decoding allows
        self.task = get_task(task)
        self.card_info = card_info or {}

    def answer_budget(self) -> int:
        """Tokens of the longest answer validation and prediction allow (a list: ``max_objects`` items), logged."""
        tokenizer = self.processing_class.tokenizer
        budget = self.task.token_budget(self.task.grammar(tokenizer, self.answer_format, self.labels, None,
                                                          self.max_objects))
        if self.max_objects is not None:
            logger.info("list answers: at most %d objects (the longest training answer), %d tokens at most "
                        "(max_new_tokens)", self.max_objects, budget)
        return budget

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        self._box_target = eval_dataset if eval_dataset is not None else self.eval_dataset
        return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix: str = "eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)
        dataset = getattr(self, "_box_target", None)
        if dataset is not None and self.box_eval_samples >= 0 and metric_key_prefix.startswith(("eval", "test")):
            if isinstance(dataset, dict):  # several eval sets: the Trainer evaluates them one by one
                dataset = dataset[metric_key_prefix.removeprefix("eval_")]
            output.metrics.update(self.generate_box_metrics(dataset, metric_key_prefix))
        return output

    def generate_box_metrics(self, dataset, prefix: str = "eval") -> dict[str, float]:
        """Generate on this rank's shard of the subset, gather, score; write the grid on the main process.

        The metrics are the task's (:meth:`~bbox_sft.tasks.base.Task.score`). With a calibration
        (fitted at the end of training) they also hold the AUROC and the expected calibration error of
        the box confidence.
        """
        task = self.task
        n = len(dataset) if self.box_eval_samples == 0 else min(self.box_eval_samples, len(dataset))
        predictions = self.generate_gathered(dataset, n)
        truths = [task.target(r) for r in dataset.select(range(n))]
        answers, scores = [task.answer(p) for p in predictions], [task.scores(p) for p in predictions]
        metrics = {f"{prefix}_{k}": v for k, v in task.score(answers, truths, scores).items()}
        if self.calibration is not None:
            ious = [iou(b, r) for b, r in zip(answers, truths)]
            confidences = [p.confidence for p in predictions]
            metrics.update({f"{prefix}_{k}": v for k, v in confidence_metrics(confidences, ious).items()})
        if self.accelerator.is_main_process:
            self._write_grid(dataset, predictions, metrics, prefix)
        return metrics

    def generate_gathered(self, dataset, n: int) -> list[Prediction]:
        """Predictions for the first ``n`` records, generated in equal shards on every rank and gathered in order.

        Every rank gets a shard of the same size (the last ones padded with repeats, dropped after the
        gather) and generates under TRL's ``unwrap_model_for_generation``: under FSDP or ZeRO-3 every
        rank must take part in every forward pass, so equal shards and ``synced_gpus`` keep them in step.
        Each record asks its own question (its prompt); list answers may name any trained label.
        """
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        shard, padded = equal_shard(n, rank, world)
        rows = dataset.select(padded)
        sharded = world > 1 and (self.is_fsdp_enabled or self.is_deepspeed_enabled)
        options = dict(task=self.task, answer_format=self.answer_format, constrained=self.constrained_decoding,
                       batch_size=self.args.per_device_eval_batch_size, progress=self.accelerator.is_main_process,
                       synced_gpus=sharded, calibration=self.calibration if self.task.calibrates else None,
                       instruction=[instruction_of(p) for p in rows["prompt"]], labels=self.labels,
                       max_objects=self.max_objects)
        # the context turns activation checkpointing off for generation and back on after it: with the run's own
        # kwargs (TRL's default would re-enable it without them, non-reentrant)
        with unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                         gradient_checkpointing_kwargs=self.args.activation_checkpointing_kwargs
                                         ) as model:
            predictions = generate_answers(model, self.processing_class, list(rows["image"]), **options)
        mine = list(zip(shard, predictions))  # the padding is left out here
        gathered = sorted(gather_object(mine), key=lambda pair: pair[0]) if world > 1 else mine
        if [i for i, _ in gathered] != list(range(n)):
            raise RuntimeError(f"validation gathered answers for {[i for i, _ in gathered]}, expected 0..{n - 1}")
        return [p for _, p in gathered]

    def calibrate_confidence(self) -> Calibration | None:
        """Fit P(IoU >= 0.5) on the whole validation split and save it beside the model (main process).

        Every rank generates its shard and fits the same calibration from the gathered predictions.
        """
        dataset = self.calibration_dataset
        if not self.task.calibrates:
            logger.info("box confidence: not calibrated for the %s task", self.task.name)
            return None
        if dataset is None or len(dataset) == 0 or not self.constrained_decoding:
            logger.warning("box confidence not calibrated: %s", "constrained decoding is off"
                           if dataset is not None and len(dataset) else "no validation split")
            return None
        predictions = self.generate_gathered(dataset, len(dataset))
        self.calibration = fit_from_predictions(predictions, [self.task.target(r) for r in dataset])
        if self.calibration is not None and self.accelerator.is_main_process:
            path = self.calibration.save(self.args.output_dir)
            logger.info("box confidence calibrated on %d validation images (hit rate %.2f): %s",
                        self.calibration.fitted_on, self.calibration.hit_rate, path)
        return self.calibration

    def _write_grid(self, dataset, predictions: list[Prediction], metrics: dict[str, float],
                    prefix: str = "eval") -> None:
        folder = Path(self.args.output_dir) / "validation"
        folder.mkdir(parents=True, exist_ok=True)
        step, task = self.state.global_step, self.task
        shown = dataset.select(range(min(self.grid_images, len(predictions))))
        name = f"step-{step:06d}.png" if prefix == "eval" else f"{prefix}-step-{step:06d}.png"
        image_grid([task.draw(r["image"], task.target(r), task.answer(p), task.caption(r, p))
                    for r, p in zip(shown, predictions)]).save(folder / name)
        record = {"step": step, "split": prefix, **metrics,
                  "answers": [p.raw for p in predictions[: self.grid_images]]}
        if task.answers_list:  # what mAP ranked the boxes by
            record["object_scores"] = [p.object_scores for p in predictions[: self.grid_images]]
        with open(folder / "history.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    # what the training curve shows of the logs: (key, name, its spread's key); GRPO plots its mean reward
    curve: tuple[str, str, str | None] = ("loss", "training loss", None)

    def save_training_curves(self) -> Path:
        """``training_curves.png`` beside the model: the training quantity and the validation metric over steps."""
        key, name, spread = self.curve
        metric = self.task.metric_for_best_model
        return save_training_curves(self.state.log_history, Path(self.args.output_dir) / "training_curves.png",
                                    metric, "validation " + metric.removeprefix("eval_").replace("_", " "),
                                    train_key=key, train_name=name, spread_key=spread)

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None,
                          tags: str | list[str] | None = None, **kwargs: Any) -> None:
        """Our card (base model, peft, datasets, box metrics of the saved model, a peft usage snippet), not TRL's."""
        if not self.is_world_process_zero():
            return
        metrics, source = self.saved_model_metrics()
        key = self.task.metric_for_best_model.replace("eval_", "test_", 1)
        tests = [e for e in self.state.log_history if key in e]
        write_model_card(
            self.args.output_dir,
            base_model=self.card_info.get("base_model") or getattr(self.model.config, "_name_or_path", None),
            dataset_name=dataset_name or self.card_info.get("dataset_name"),
            metrics=metrics,
            metrics_source=source,
            test_metrics=tests[-1] if tests else None,
            answer_format=self.answer_format,
            hub_model_id=self.args.hub_model_id,
            task=self.task,
            training=self.card_info.get("training"),
            tags=tuple(self.card_info.get("tags", ())),
        )

    def saved_model_metrics(self) -> tuple[dict[str, Any], str]:
        """The validation metrics of the model that was saved, and which evaluation they come from.

        With ``load_best_model_at_end`` that is the best checkpoint's evaluation, not the last one.
        """
        key = self.task.metric_for_best_model
        evals = [e for e in self.state.log_history if key in e]
        best = self.state.best_model_checkpoint
        if self.args.load_best_model_at_end and best:
            step = int(Path(best).name.rsplit("-", 1)[-1])
            chosen = [e for e in evals if e.get("step") == step]
            if chosen:
                return chosen[-1], f"best checkpoint, step {step}, by {self.args.metric_for_best_model}"
        if evals:
            return evals[-1], f"last evaluation, step {evals[-1].get('step')}"
        return {}, "no evaluation ran"


def reentrant_under_zero3(args, peft: bool) -> None:
    """LoRA under DeepSpeed ZeRO-3 with activation checkpointing: reentrant checkpointing, in the kwargs the
    Trainer reads (``activation_checkpointing_kwargs``).

    ZeRO-3 releases frozen parameters during the recompute of non-reentrant checkpointing, and DeepSpeed before
    0.19.3 then fails the first backward pass ("recomputed ... shape [0]"). TRL forces reentrant here too, but
    through ``gradient_checkpointing_kwargs``, which transformers 5.24 reads only while parsing the arguments.
    """
    plugin = getattr(args, "deepspeed_plugin", None)
    if peft and plugin is not None and plugin.zero_stage == 3 and args.activation_checkpointing:
        kwargs = {**(args.activation_checkpointing_kwargs or {}), "use_reentrant": True}
        args.activation_checkpointing_kwargs = args.gradient_checkpointing_kwargs = kwargs


def equal_shard(n: int, rank: int, world: int) -> tuple[list[int], list[int]]:
    """(this rank's indices of 0..n-1, the same padded to the common shard size with repeats of its last index).

    Contiguous shards of ``ceil(n / world)``; a rank left with nothing repeats index 0 (n = 0: no work).
    """
    size = -(-n // world)
    shard = list(range(rank * size, min(n, (rank + 1) * size)))
    filler = shard[-1] if shard else 0
    return shard, (shard + [filler] * (size - len(shard))) if n else []

