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

import datasets
from trl import ModelConfig, SFTConfig

from bbox_sft.callbacks import make_callbacks
from bbox_sft.chat import completion_messages
from bbox_sft.collator import BoxSFTCollator, add_lengths
from bbox_sft.configs import BoxScriptArguments
from bbox_sft.model import describe_trainable
from bbox_sft.recipe_run import (
    build_tiny_model,
    load_task_dataset,
    parse_recipe,
    settle,
    setup_logging,
    train_and_finish,
)
from bbox_sft.records import records_task
from bbox_sft.starting_point import StartingPoint, load_starting_point
from bbox_sft.tasks import Task, get_task
from bbox_sft.trainer import BoxSFTTrainer

logger = logging.getLogger("bbox_sft.train")


def build_trainer(script_args: BoxScriptArguments, training_args: SFTConfig, model_args: ModelConfig) -> BoxSFTTrainer:
    """Every stage up to a ready trainer: checks, last checkpoint, model, processor, dataset, trainer."""
    setup_logging(training_args, script_args, training_args, model_args)

    ################
    # Every setting takes effect or is refused, before anything is loaded or written
    ################
    if training_args.remove_unused_columns:
        raise ValueError("remove_unused_columns must be false: the collator reads the image, prompt and "
                         "completion columns")
    task, setup, dtype = settle(script_args, training_args, model_args)

    ################
    # Model and processor: a base model (a tiny random Qwen3-VL is built first where the recipe asks for it), or an
    # earlier run's adapter, trained further
    ################
    build_tiny_model(script_args, model_args.model_name_or_path, training_args)
    start = StartingPoint.resolve(model_args.model_name_or_path)
    model, processor, peft_config, how = load_starting_point(start, script_args, model_args, setup, dtype)
    logger.info("training %s", how)

    ################
    # Dataset (built by the main process first where the recipe points at images + masks)
    ################
    dataset = load_task_dataset(script_args, training_args, task)
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
    trainer = BoxSFTTrainer(
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
        card_info={"base_model": start.base, "dataset_name": script_args.dataset_name, "training": how,
                   "started_from": start.name},
        final_eval_dataset=dataset.get("test"),
        labels=task.labels(dataset[script_args.dataset_train_split]),
        max_objects=task.max_objects(dataset[script_args.dataset_train_split]),
        task=task,
        calibration_dataset=dataset.get(script_args.dataset_test_split),
    )
    return trainer


def main(script_args: BoxScriptArguments, training_args: SFTConfig, model_args: ModelConfig) -> BoxSFTTrainer:
    trainer = build_trainer(script_args, training_args, model_args)
    logger.info(describe_trainable(trainer.model))
    return train_and_finish(trainer, script_args, training_args, method="sft")


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
    """``train.py RECIPE.yaml [--field value ...]``, or TRL's ``--config RECIPE.yaml``; the collator reads the
    image/prompt/completion columns, which TRL would otherwise remove."""
    return parse_recipe((BoxScriptArguments, SFTConfig, ModelConfig), argv, prog, remove_unused_columns=False)


if __name__ == "__main__":
    main(*parse_args())
