"""Every command in README.md parses against the code as it is now, so the README cannot go stale."""

from __future__ import annotations

import re
import shlex
import warnings
from pathlib import Path

import pytest
from transformers import HfArgumentParser

from bbox_sft import cli
from bbox_sft.app import AppArguments
from bbox_sft.data.prepare import PrepareArguments
from bbox_sft.evaluation import EvalArguments
from bbox_sft.grpo import parse_args as parse_grpo_args
from bbox_sft.labelling import LabelArguments
from bbox_sft.serving import ServeArguments
from bbox_sft.train import parse_args

REPO = Path(__file__).resolve().parents[1]
PARSERS = {
    "synth": cli.SynthArguments,
    "prepare": PrepareArguments,
    "eval": EvalArguments,
    "predict": cli.PredictArguments,
    "merge": cli.MergeArguments,
    "push": cli.PushArguments,
    "app": AppArguments,
    "serve": ServeArguments,
    "label": LabelArguments,
}


def _commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line]


COMMANDS = _commands()


def test_readme_shows_both_setup_commands_first() -> None:
    assert COMMANDS[:2] == ["make demo", "make test"]
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, flags=re.M) and re.search(r"^test:", makefile, flags=re.M)


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("bbox-sft ")])
def test_cli_commands_parse(command: str) -> None:
    words = shlex.split(command)
    assert words[1] in cli.COMMANDS, f"unknown sub-command in README: {command}"
    rest = [w for w in words[2:] if w != "--download_help"]
    if words[1] in ("train", "grpo"):  # the recipe and its overrides go to train.py or grpo.py
        recipe = next(i for i, w in enumerate(rest) if w.endswith(".yaml") and rest[i - 1:i] != ["--config_file"])
        (parse_grpo_args if words[1] == "grpo" else parse_args)([str(REPO / rest[recipe]), *rest[recipe + 1:]])
    elif rest:
        HfArgumentParser(PARSERS[words[1]]).parse_args_into_dataclasses(args=rest)


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("accelerate launch")])
def test_training_commands_parse(command: str) -> None:
    words = shlex.split(command)
    if "--config_file" in words:
        assert (REPO / words[words.index("--config_file") + 1]).is_file()
    script = next(i for i, w in enumerate(words) if w in ("bbox_sft/train.py", "bbox_sft/grpo.py"))
    args = words[script + 1 :]
    args[0] = str(REPO / args[0])
    (parse_grpo_args if words[script].endswith("grpo.py") else parse_args)(args)


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("python bench/")])
def test_benchmarks_exist(command: str) -> None:
    assert (REPO / shlex.split(command)[1]).is_file()


def test_every_recipe_parses_without_deprecated_fields() -> None:
    for recipe in sorted((REPO / "recipes").glob("*.yaml")):
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # e.g. gradient_checkpointing -> activation_checkpointing
            warnings.simplefilter("error", DeprecationWarning)
            parse = parse_grpo_args if "grpo" in recipe.stem else parse_args
            script_args, training_args, model_args = parse([str(recipe)])
        assert model_args.model_name_or_path and script_args.dataset_name, recipe


def test_accelerate_configs_load() -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    configs = sorted((REPO / "recipes" / "accelerate").glob("*.yaml"))
    assert {c.stem for c in configs} >= {"single_gpu", "multi_gpu", "fsdp", "zero2", "zero3"}
    for config in configs:
        load_config_from_file(str(config))


def _options(*arguments: type) -> set[str]:
    from dataclasses import fields

    return {f"--{f.name}" for dataclass in arguments for f in fields(dataclass) if f.init}


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_command_help_exits_0_and_lists_every_option(command: str, capsys) -> None:
    """``bbox-sft <command> --help`` prints the command's options (each field of its dataclass, or the recipe's
    three for train) and exits 0, as a user typing it first expects."""
    from trl import ModelConfig

    from bbox_sft.configs import BoxGRPOArguments, BoxScriptArguments

    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--help"])
    assert exited.value.code == 0, capsys.readouterr()
    printed = capsys.readouterr().out
    assert printed.startswith(f"usage: bbox-sft {command}") or f"usage: bbox-sft {command}" in printed
    expected = (_options(BoxScriptArguments, ModelConfig) | {"--learning_rate", "--per_device_train_batch_size"}
                if command == "train" else
                _options(BoxGRPOArguments, ModelConfig) | {"--num_generations", "--temperature", "--beta"}
                if command == "grpo" else _options(PARSERS[command]))
    missing = {option for option in expected if option not in printed}
    assert not missing, f"bbox-sft {command} --help leaves out {sorted(missing)}"
