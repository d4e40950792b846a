"""The stages a training script shares, whatever its trainer (SFT in ``train.py``, GRPO in ``grpo.py``): logging,
the checkpoint to resume, the tiny model and the dataset a recipe asks for, and everything after ``train()``
(saving the model with its run description, the box confidence, the test evaluation, the card, the push)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from transformers.trainer_utils import get_last_checkpoint

from .data.prepare import load_or_build_dataset
from .model import DeviceSetup, check_model_args, detect_device, resolve_dtype, told_cpu
from .saved_run import SavedRun
from .tasks import Task, get_task

logger = logging.getLogger(__name__)


def parse_recipe(types: tuple[type, ...], argv: list[str] | None, prog: str | None, **defaults: Any) -> tuple:
    """``SCRIPT RECIPE.yaml [--field value ...]`` (or TRL's ``--config RECIPE.yaml``) into ``types`` with TRL's
    parser. The mixed precision defaults to the device's (TRL's configs default to bf16 and refuse it without a
    GPU; a recipe or the command line can still set bf16/fp16); the weights' dtype is derived once use_peft is
    known (:func:`~bbox_sft.model.resolve_dtype`). A process told to stay on the CPU (``accelerate launch --cpu``,
    or ``use_cpu`` in the recipe) gets the CPU's defaults and is ``use_cpu`` for transformers too, which would
    otherwise still pick a visible GPU for a single process. ``defaults``: the script's own."""
    from trl import TrlParser

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith((".yaml", ".yml")):
        argv = ["--config", *argv]

    def parse(setup) -> tuple:
        parser = TrlParser(types, prog=prog)
        parser.set_defaults_with_config(bf16=setup.bf16, fp16=setup.fp16, dtype=None, **defaults,
                                        **({"use_cpu": True} if told_cpu() else {}))
        return parser.parse_args_and_config(args=argv)

    setup = detect_device()
    parsed = parse(setup)
    if parsed[1].use_cpu and setup.device != "cpu":  # told so by the recipe or the command line
        parsed = parse(detect_device(cpu=True))
    return parsed


def setup_logging(training_args, *parsed: Any) -> None:
    """bbox_sft, datasets and transformers log at the process's level (the main process's, quieter elsewhere)."""
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
                        handlers=[logging.StreamHandler(sys.stdout)])
    log_level = training_args.get_process_log_level()
    logging.getLogger("bbox_sft").setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    for name, args in zip(("Script", "Training", "Model"), parsed):  # as TRL's scripts log them
        logger.info("%s parameters %s", name, args)


def settle(script_args, training_args, model_args) -> tuple[Task, DeviceSetup, torch.dtype | str]:
    """(the task, the device, the weights' dtype): every general setting takes effect or is refused before anything
    is loaded or written (the model fields, the checkpoint to resume); said in the log."""
    task = get_task(script_args.task)
    setup = detect_device(cpu=training_args.use_cpu)
    check_model_args(model_args, setup, script_args.train_vision_tower)
    dtype = resolve_dtype(model_args, setup)
    logger.info("device %s, weights %s, mixed precision %s, attention %s", setup.device, dtype,
                "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "no", setup.attn_implementation)
    resolve_resume(training_args)
    return task, setup, dtype


def resolve_resume(training_args) -> None:
    """``resume_from_checkpoint: last`` (or true) becomes the output folder's last checkpoint, or is refused."""
    if training_args.resume_from_checkpoint in ("true", "True", "last"):
        last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        if last is None:
            raise FileNotFoundError(f"resume_from_checkpoint: no checkpoint in {training_args.output_dir}")
        training_args.resume_from_checkpoint = last
    if training_args.resume_from_checkpoint:
        logger.info("resuming from %s", training_args.resume_from_checkpoint)


def build_tiny_model(script_args, model_path: str, training_args) -> None:
    """A tiny random Qwen3-VL at ``model_path`` where the recipe asks for one and the folder is missing."""
    if script_args.build_tiny_model and not Path(model_path).exists():
        with training_args.main_process_first(desc="building the tiny model"):
            if not Path(model_path).exists():
                from .tiny import save_tiny_model

                save_tiny_model(model_path, script_args.tiny_hidden_size, script_args.tiny_layers, training_args.seed)


def load_task_dataset(script_args, training_args, task: Task) -> datasets.DatasetDict:
    """The recipe's dataset (built by the main process first where it points at raw data), checked against the
    task, with its train split non-empty and its evaluation split present."""
    with training_args.main_process_first(desc="loading the dataset"):
        dataset = load_or_build_dataset(
            script_args.dataset_name,
            data_dir=script_args.data_dir,
            synthetic_images=script_args.synthetic_images,
            synthetic_domain=script_args.synthetic_domain,
            synthetic_seed=script_args.synthetic_seed,
            train_size=script_args.train_size,
            val_size=script_args.val_size,
            test_size=script_args.test_size,
            box_mode=script_args.box_mode,
            max_objects=script_args.max_objects,
            answer_format=script_args.answer_format,
            task=script_args.task,
        )
    records = dataset.get(script_args.dataset_train_split)
    if records is not None:
        task.check_dataset(records, script_args.dataset_name)
    for split in (script_args.dataset_train_split, script_args.dataset_test_split):
        if split not in dataset or (split == script_args.dataset_train_split and len(dataset[split]) == 0):
            raise ValueError(f"{script_args.dataset_name}: split {split!r} is missing or empty "
                             f"({ {name: len(d) for name, d in dataset.items()} })")
    return dataset


RUN_FIELDS = ("training", "started_from", "reward")  # of a trainer's card_info, saved with the run too


def train_and_finish(trainer, script_args, training_args, method: str):
    """Train (resuming where asked), save the model with its processor and run description (``method``, "sft" or
    "grpo", and how it was trained: the trainer's card_info), calibrate the box confidence, evaluate on the test
    split, write the card, push."""
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = train_result.metrics
    metrics["train_samples"] = len(trainer.train_dataset)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()

    trainer.model.config.use_cache = True
    trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        trainer.processing_class.save_pretrained(training_args.output_dir)  # with the pixel budget of this run
        budget = trainer.answer_budget()
        quantized = getattr(trainer.accelerator.unwrap_model(trainer.model).config, "quantization_config", None)
        SavedRun.write(training_args.output_dir, script_args, trainer.labels, trainer.max_objects, budget,
                       quantization=quantized.to_dict() if quantized is not None else None,
                       extra={"method": method, **{k: trainer.card_info[k] for k in RUN_FIELDS
                                                   if k in trainer.card_info}})  # what eval, predict read
    logger.info("model saved to %s", training_args.output_dir)

    # the box confidence, calibrated on the validation split (saved beside the model, pushed with it)
    if script_args.calibrate_confidence:
        trainer.calibrate_confidence()

    # the test split (box metrics into all_results.json), then the model card; transformers sets do_eval by
    # itself whenever eval_strategy is not "no"
    test = trainer.final_eval_dataset
    if training_args.do_eval and (test is None or len(test) == 0):
        logger.warning("do_eval: %s has no test split; the final test evaluation is skipped", script_args.dataset_name)
    elif training_args.do_eval:
        metrics = trainer.evaluate(test, metric_key_prefix="test")
        metrics["test_samples"] = len(test)
        trainer.log_metrics("test", metrics)
        trainer.save_metrics("test", metrics)
    if trainer.accelerator.is_main_process:
        trainer.create_model_card(dataset_name=script_args.dataset_name)
        trainer.save_training_curves()

    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return trainer
