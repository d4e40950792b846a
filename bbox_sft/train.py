"""Fine-tune Qwen3-VL with LoRA (or QLoRA, or fully) to answer with JSON boxes (any task of bbox_sft.tasks).

Usage:

    # one GPU, Apple silicon or CPU
    accelerate launch bbox_sft/train.py recipes/qwen3vl_lora.yaml

    # several GPUs (DDP); FSDP and DeepSpeed configs sit beside it
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml bbox_sft/train.py recipes/qwen3vl_lora.yaml

    # the tiny model on a synthetic set, on CPU, in minutes; any field can be overridden
    accelerate launch --cpu bbox_sft/train.py recipes/tiny_cpu.yaml --max_steps 20

The recipe is a YAML file of ``BoxScriptArguments``, ``SFTConfig`` and ``ModelConfig`` fields,
given as the first argument or with ``--config``.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import datasets
import torch
import transformers
from transformers.trainer_utils import get_last_checkpoint
from trl import ModelConfig, SFTConfig, TrlParser

from bbox_sft.chat import completion_messages
from bbox_sft.collator import BoxSFTCollator, add_lengths
from bbox_sft.configs import BoxScriptArguments
from bbox_sft.data.prepare import load_or_build_dataset
from bbox_sft.model import (
    check_answer_format,
    check_model_args,
    describe_trainable,
    detect_device,
    load_model,
    load_processor,
    lora_config,
    quantization_config,
    set_trainable,
    told_cpu,
    weights_dtype,
)
from bbox_sft.records import records_task
from bbox_sft.saved_run import SavedRun
from bbox_sft.tasks import Task, get_task
from bbox_sft.trainer import BoxSFTTrainer, make_callbacks

logger = logging.getLogger("bbox_sft.train")


def build_trainer(script_args: BoxScriptArguments, training_args: SFTConfig, model_args: ModelConfig) -> BoxSFTTrainer:
    """Every stage up to a ready trainer: checks, last checkpoint, model, processor, dataset, trainer."""
    ################
    # Logging
    ################
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    for name in ("bbox_sft", "bbox_sft.train"):
        logging.getLogger(name).setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.info("Script parameters %s", script_args)
    logger.info("Training parameters %s", training_args)
    logger.info("Model parameters %s", model_args)

    ################
    # Every setting takes effect or is refused, before anything is loaded or written
    ################
    task = get_task(script_args.task)
    setup = detect_device(cpu=training_args.use_cpu)
    check_model_args(model_args, setup, script_args.train_vision_tower)
    if training_args.remove_unused_columns:
        raise ValueError("remove_unused_columns must be false: the collator reads the image, prompt and "
                         "completion columns")
    if model_args.dtype is None:  # derived: fp32 where weights train in full, the device's half under LoRA
        model_args.dtype = str(weights_dtype(setup, trains_in_full=not model_args.use_peft)).removeprefix("torch.")
    dtype = model_args.dtype if model_args.dtype == "auto" else getattr(torch, model_args.dtype)
    logger.info("device %s, weights %s, mixed precision %s, attention %s", setup.device, dtype,
                "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "no", setup.attn_implementation)

    ################
    # Last checkpoint
    ################
    if training_args.resume_from_checkpoint in ("true", "True", "last"):
        last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        if last is None:
            raise FileNotFoundError(f"resume_from_checkpoint: no checkpoint in {training_args.output_dir}")
        training_args.resume_from_checkpoint = last
    if training_args.resume_from_checkpoint:
        logger.info("resuming from %s", training_args.resume_from_checkpoint)

    ################
    # Model and processor (a tiny random Qwen3-VL is built first where the recipe asks for it)
    ################
    model_path = model_args.model_name_or_path
    if script_args.build_tiny_model and not Path(model_path).exists():
        with training_args.main_process_first(desc="building the tiny model"):
            if not Path(model_path).exists():
                from bbox_sft.tiny import save_tiny_model

                save_tiny_model(model_path, script_args.tiny_hidden_size, script_args.tiny_layers, training_args.seed)
    check_answer_format(model_path, script_args.answer_format, model_args.model_revision)
    processor = load_processor(
        model_path, script_args.image_min_side, script_args.image_max_side, revision=model_args.model_revision
    )
    model = load_model(
        model_path,
        setup,
        quantization=quantization_config(model_args),  # TRL's 4-bit or 8-bit, the vision side left unquantized
        attn_implementation=model_args.attn_implementation,
        revision=model_args.model_revision,
        dtype=dtype,
    )
    peft_config = None
    if model_args.use_peft:
        peft_config = lora_config(model_args, script_args.train_vision_tower, script_args.train_merger)
    else:
        set_trainable(model, script_args.train_vision_tower, script_args.train_merger)

    ################
    # Dataset (built by the main process first where the recipe points at images + masks)
    ################
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
    dataset = with_answer_format(dataset, script_args.answer_format, task)
    dataset = datasets.DatasetDict({name: add_lengths(split, processor) for name, split in dataset.items()})
    longest = max(max(split["length"], default=0) for split in dataset.values())
    if training_args.max_length is not None and longest > training_args.max_length:
        raise ValueError(f"max_length {training_args.max_length} is shorter than the longest record ({longest} "
                         "tokens): nothing is ever truncated here (that would cut image tokens or the answer). "
                         "Raise max_length, set it to null, or lower image_max_side.")
    eval_dataset = dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None

    ################
    # Trainer
    ################
    return BoxSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=eval_dataset,
        processing_class=processor,
        data_collator=BoxSFTCollator(processor),
        peft_config=peft_config,
        callbacks=make_callbacks(script_args.callbacks, script_args),
        box_eval_samples=script_args.box_eval_samples,
        answer_format=script_args.answer_format,
        constrained_decoding=script_args.constrained_decoding,
        card_info={"base_model": model_path, "dataset_name": script_args.dataset_name},
        final_eval_dataset=dataset.get("test"),
        labels=task.labels(dataset[script_args.dataset_train_split]),
        max_objects=task.max_objects(dataset[script_args.dataset_train_split]),
        task=task,
        calibration_dataset=dataset.get(script_args.dataset_test_split),
    )


def main(script_args: BoxScriptArguments, training_args: SFTConfig, model_args: ModelConfig) -> BoxSFTTrainer:
    trainer = build_trainer(script_args, training_args, model_args)
    logger.info(describe_trainable(trainer.model))

    ################
    # Training loop
    ################
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = train_result.metrics
    metrics["train_samples"] = len(trainer.train_dataset)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()

    ################
    # Save model
    ################
    trainer.model.config.use_cache = True
    trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        processor = trainer.processing_class
        processor.save_pretrained(training_args.output_dir)  # with the pixel budget of this run
        budget = trainer.answer_budget()
        quantized = getattr(trainer.accelerator.unwrap_model(trainer.model).config, "quantization_config", None)
        SavedRun.write(training_args.output_dir, script_args, trainer.labels, trainer.max_objects, budget,
                       quantization=quantized.to_dict() if quantized is not None else None)  # what eval, predict read
    logger.info("model saved to %s", training_args.output_dir)

    ################
    # Calibrate the box confidence on the validation split (saved beside the model, pushed with it)
    ################
    if script_args.calibrate_confidence:
        trainer.calibrate_confidence()

    ################
    # Evaluate on the test split (box metrics into all_results.json), then the model card
    ################
    # (transformers sets do_eval by itself whenever eval_strategy is not "no")
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

    ################
    # Push to the Hub
    ################
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    return trainer


def with_answer_format(dataset: datasets.DatasetDict, answer_format: str, task: Task | str | None = None
                       ) -> datasets.DatasetDict:
    """Rewrite ``completion`` from each record's target when the dataset was built in another answer format
    (``task``: the records' own, by default)."""
    split = dataset[next(iter(dataset))]
    task = get_task(task or records_task(split) or "subject")
    sample = split[0]
    if sample["completion"][0]["content"][0]["text"] == task.answer_text(task.target(sample), answer_format):
        return dataset
    logger.info("rewriting answers in the %r format", answer_format)
    return dataset.map(lambda r: {"completion": completion_messages(task.answer_text(task.target(r), answer_format))})


def parse_args(argv: list[str] | None = None, prog: str | None = None
               ) -> tuple[BoxScriptArguments, SFTConfig, ModelConfig]:
    """``train.py RECIPE.yaml [--field value ...]``, or TRL's ``--config RECIPE.yaml``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].endswith((".yaml", ".yml")):
        argv = ["--config", *argv]
    setup = detect_device()
    parsed = _parse(argv, prog, setup)
    if parsed[1].use_cpu and setup.device != "cpu":  # told so by the recipe or the command line: the CPU's defaults
        parsed = _parse(argv, prog, detect_device(cpu=True))
    return parsed


def _parse(argv: list[str], prog: str | None, setup) -> tuple[BoxScriptArguments, SFTConfig, ModelConfig]:
    parser = TrlParser((BoxScriptArguments, SFTConfig, ModelConfig), prog=prog)
    # SFTConfig defaults to bf16 and refuses it without a GPU: the mixed precision defaults to the device's
    # instead (a recipe or the command line can still set bf16/fp16). The weights' dtype (TRL's default is
    # float32) is derived in build_trainer once use_peft is known, and the collator needs the
    # image/prompt/completion columns that TRL would otherwise remove. A process accelerate launched with
    # --cpu is use_cpu too: transformers would otherwise still pick a visible GPU for a single process.
    parser.set_defaults_with_config(bf16=setup.bf16, fp16=setup.fp16, dtype=None, remove_unused_columns=False,
                                    **({"use_cpu": True} if told_cpu() else {}))
    return parser.parse_args_and_config(args=argv)


if __name__ == "__main__":
    main(*parse_args())
