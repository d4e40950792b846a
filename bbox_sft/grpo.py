"""Reinforcement after SFT: GRPO (TRL's ``GRPOTrainer``) on the task's own reward, every rollout inside the grammar.

Usage:

    # after recipes/qwen3vl_lora.yaml: its adapter trained further on the IoU
    accelerate launch bbox_sft/grpo.py recipes/qwen3vl_grpo.yaml

    # several GPUs, rollouts on a vLLM server with the grammar plugged in (README: the RL stage)
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml bbox_sft/grpo.py recipes/qwen3vl_grpo.yaml \\
        --use_vllm true --vllm_mode server

    # the tiny model on CPU, in minutes
    accelerate launch --cpu bbox_sft/grpo.py recipes/tiny_grpo_cpu.yaml

The recipe is a YAML file of ``BoxGRPOArguments``, ``GRPOConfig`` and ``ModelConfig`` fields. ``model_name_or_path``
is the SFT run to start from (its adapter folder or Hub id; its task, answer format and pixel budget are this run's
defaults) or a base model. What the grammar changes in the algorithm is in :mod:`bbox_sft.grpo_trainer`.
"""

from __future__ import annotations

import logging

from trl import GRPOConfig, ModelConfig

from bbox_sft.callbacks import make_callbacks
from bbox_sft.configs import BoxGRPOArguments
from bbox_sft.grpo_trainer import BoxGRPOTrainer, check_sampling, reward_function
from bbox_sft.model import describe_trainable
from bbox_sft.recipe_run import (
    build_tiny_model,
    load_task_dataset,
    parse_recipe,
    settle,
    setup_logging,
    train_and_finish,
)
from bbox_sft.starting_point import StartingPoint, load_starting_point, run_defaults
from bbox_sft.tasks import Task

logger = logging.getLogger("bbox_sft.grpo")


def build_trainer(script_args: BoxGRPOArguments, training_args: GRPOConfig, model_args: ModelConfig
                  ) -> BoxGRPOTrainer:
    """Every stage up to a ready trainer: the starting point and its defaults, checks, model, dataset, trainer."""
    setup_logging(training_args, script_args, training_args, model_args)
    build_tiny_model(script_args, model_args.model_name_or_path, training_args)
    start = StartingPoint.resolve(model_args.model_name_or_path)
    run_defaults(start, script_args)

    ################
    # Every setting takes effect or is refused, before anything is loaded or written
    ################
    check_sampling(training_args)
    task, setup, dtype = settle(script_args, training_args, model_args)

    ################
    # Model and processor: the SFT adapter trained further (or merged, with a new LoRA), or a base model
    ################
    model, processor, peft_config, how = load_starting_point(start, script_args, model_args, setup, dtype)
    logger.info("GRPO trains %s", how)

    ################
    # Dataset: the SFT records (image, prompt; the truth the reward reads)
    ################
    dataset = load_task_dataset(script_args, training_args, task)
    train = dataset[script_args.dataset_train_split]
    labels, max_objects = task.labels(train), task.max_objects(train)
    check_rollouts(task, script_args.answer_format, labels, max_objects, train, processor, training_args)

    reward = reward_function(task, script_args.reward_bonus)
    bonus = f" + {script_args.reward_bonus:g} per hit (IoU >= 0.5)" if script_args.reward_bonus else ""
    return BoxGRPOTrainer(
        model=model,
        reward_funcs=[reward],
        args=training_args,
        train_dataset=train,
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        processing_class=processor,
        peft_config=peft_config,
        callbacks=make_callbacks(script_args.callbacks, script_args),
        box_eval_samples=script_args.box_eval_samples,
        answer_format=script_args.answer_format,
        constrained_decoding=script_args.constrained_decoding,
        card_info={"base_model": start.base, "dataset_name": script_args.dataset_name,
                   "training": f"GRPO (TRL's GRPOTrainer) of {how}; reward {reward.__name__}{bonus}; every rollout "
                               "sampled inside the answer grammar",
                   "started_from": start.name, "reward": f"{reward.__name__}{bonus}", "tags": ["grpo"]},
        final_eval_dataset=dataset.get("test"),
        labels=labels,
        max_objects=max_objects,
        task=task,
        calibration_dataset=dataset.get(script_args.dataset_test_split),
    )


def check_rollouts(task: Task, answer_format: str, labels, max_objects, train, processor, args: GRPOConfig) -> None:
    """Refuse what would cut or un-constrain rollouts: a ``max_completion_length`` under the grammar's longest
    answer; with vLLM, rows whose grammars differ (TRL sends one set of sampling parameters for a whole batch, so
    only a grammar shared by every row reaches the server: not the phrase task's, whose labels come from each
    query). With vLLM the grammar is named in every request (``generation_kwargs.extra_args``)."""
    grammar = task.grammar(processor.tokenizer, answer_format, labels, None, max_objects)
    longest = task.token_budget(grammar)
    if args.max_completion_length is not None and args.max_completion_length < longest:
        raise ValueError(f"max_completion_length {args.max_completion_length} is shorter than the longest answer "
                         f"the grammar allows ({longest} tokens): rollouts would be cut; raise it")
    if not args.use_vllm:
        return
    queries = set(train["query"]) if task.takes_query and "query" in train.column_names else {None}
    specs = {task.grammar_spec(answer_format, labels, q, max_objects) for q in queries}
    if len(specs) > 1:
        raise ValueError(f"use_vllm: the {task.name} task's grammar differs between rows ({len(specs)} of them, "
                         "from their queries), and TRL sends one set of sampling parameters per batch; sample on "
                         "the transformers path (use_vllm: false)")
    spec = specs.pop()
    args.generation_kwargs = {**(args.generation_kwargs or {}), "extra_args": spec.to_args()}
    logger.info("vLLM rollouts: every request names the grammar %s", spec.to_args())


def main(script_args: BoxGRPOArguments, training_args: GRPOConfig, model_args: ModelConfig) -> BoxGRPOTrainer:
    trainer = build_trainer(script_args, training_args, model_args)
    logger.info(describe_trainable(trainer.model))
    return train_and_finish(trainer, script_args, training_args, method="grpo")


def parse_args(argv: list[str] | None = None, prog: str | None = None
               ) -> tuple[BoxGRPOArguments, GRPOConfig, ModelConfig]:
    """``grpo.py RECIPE.yaml [--field value ...]``, or TRL's ``--config RECIPE.yaml``. Our defaults: LoRA
    (``use_peft``: the SFT adapter trains further); dropout off (``disable_dropout``: the loss then scores the policy
    the rollouts were sampled from, in eval mode); the validation split is scored by greedy answers, not rollouts,
    so its loader repeats nothing (``num_generations_eval`` 1)."""
    return parse_recipe((BoxGRPOArguments, GRPOConfig, ModelConfig), argv, prog, num_generations_eval=1,
                        use_peft=True, disable_dropout=True)


if __name__ == "__main__":
    main(*parse_args())
