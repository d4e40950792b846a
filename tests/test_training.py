"""Training end to end on the tiny Qwen3-VL: overfit (full and LoRA), DDP, kill and resume, bad configs."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForImageTextToText

from bbox_sft.data import PrepareArguments, prepare_dataset
from bbox_sft.train import main, parse_args

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "tiny_cpu.yaml")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def eight_records(synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eight") / "boxes"
    dataset = prepare_dataset(PrepareArguments(data_dir=str(synthetic_dir), output_dir=str(out),
                                               train_size=8, val_size=2, test_size=2))
    assert len(dataset["train"]) == 8
    return out


def _args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [RECIPE, "--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(out),
            "--image_min_side", "128", "--image_max_side", "160", "--logging_steps", "1",
            "--save_strategy", "no", "--build_tiny_model", "false", *extra]


def _losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_full_fine_tuning_overfits_eight_records(tiny_model_dir: Path, eight_records: Path, tmp_path: Path) -> None:
    trainer = main(*parse_args(_args(tiny_model_dir, eight_records, tmp_path / "full",
                                     "--max_steps", "30", "--learning_rate", "2e-3", "--warmup_steps", "0")))
    losses = _losses(trainer)
    assert losses[-1] < 0.25 * losses[0], losses
    assert (tmp_path / "full" / "model.safetensors").is_file()


def test_lora_overfits_and_saves_only_the_adapter(tiny_model_dir: Path, eight_records: Path, tmp_path: Path) -> None:
    out = tmp_path / "lora"
    trainer = main(*parse_args(_args(tiny_model_dir, eight_records, out, "--use_peft", "true", "--lora_r", "16",
                                     "--train_merger", "false", "--train_vision_tower", "false",
                                     "--lora_alpha", "64", "--max_steps", "60", "--learning_rate", "3e-3",
                                     "--warmup_steps", "0", "--lr_scheduler_type", "constant")))
    losses = _losses(trainer)
    # On random weights the frozen tied embeddings and final norm cap the logit scale, so LoRA gets the
    # answer tokens right (accuracy) long before the loss can fall far: both are asserted.
    assert losses[-1] < 0.65 * losses[0], losses
    accuracy = [e["mean_token_accuracy"] for e in trainer.state.log_history if "mean_token_accuracy" in e]
    assert accuracy[0] < 0.1 and accuracy[-1] > 0.85, accuracy

    assert not (out / "model.safetensors").exists()
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k for k in keys)
    assert all("language_model" in k for k in keys)  # the vision tower is not wrapped by default
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)

    base = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    trained_base = trainer.model.get_base_model()
    trained = {k.replace(".base_layer", ""): v for k, v in trained_base.state_dict().items() if "lora_" not in k}
    for name, weight in base.state_dict().items():
        assert torch.equal(weight, trained[name]), f"{name} changed under LoRA"

    reloaded = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_model_dir), str(out))
    lora_a = next(k for k in trainer.model.state_dict() if "lora_A" in k)
    assert torch.equal(reloaded.state_dict()[lora_a], trainer.model.state_dict()[lora_a])


def _run(args: list[str], timeout: int = 600, env_extra: dict[str, str] | None = None,
         **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env, **kwargs)


def _single_process_answers(adapter: Path, dataset_dir: Path, n: int) -> list[str]:
    """Raw answers of the saved adapter on the first ``n`` validation images, in one process, batch size 1."""
    import datasets

    from bbox_sft.decoding import generate_answers
    from bbox_sft.predict import load_for_inference

    model, processor = load_for_inference(adapter)
    images = list(datasets.load_from_disk(str(dataset_dir))["validation"].select(range(n))["image"])
    return [p.raw for p in generate_answers(model, processor, images, batch_size=1, progress=False)]


DDP_ON_CPU = """
import json, sys
from pathlib import Path
import torch.distributed as dist
import bbox_sft.train as train
import bbox_sft.validation as validation

generate_answers = validation.generate_answers
calls = []

def probe(model, processor, images, *args, **kwargs):  # what each rank generates, seen from inside the run
    calls.append({"world": dist.get_world_size(), "rank": dist.get_rank(), "images": len(images),
                  "model": type(model).__name__, "first_pixels": list(images[0].getdata())[:4] if images else None})
    Path(sys.argv[1], f"rank{dist.get_rank()}.json").write_text(json.dumps(calls))
    return generate_answers(model, processor, images, *args, **kwargs)

validation.generate_answers = probe
train.main(*train.parse_args(sys.argv[2:]))
"""


def test_two_process_ddp_validates_like_one_process(tiny_model_dir: Path, box_dataset_dir: Path,
                                                    tmp_path: Path) -> None:
    out, probes = tmp_path / "ddp", tmp_path / "probes"
    probes.mkdir()
    script = tmp_path / "ddp.py"
    script.write_text(DDP_ON_CPU)
    accelerate = str(Path(sys.executable).parent / "accelerate")
    # the shipped DDP config on 2 CPU processes (accelerate's --cpu flag would start one process only);
    # 5 validation images on 2 ranks: shards of 3, the second padded by one repeat that must be dropped
    result = _run([accelerate, "launch", "--config_file", "recipes/accelerate/multi_gpu.yaml", "--num_processes",
                   "2", str(script), str(probes),
                   *_args(tiny_model_dir, box_dataset_dir, out, "--use_peft", "true", "--use_cpu", "true",
                          "--max_steps", "4", "--per_device_train_batch_size", "2", "--eval_strategy", "steps",
                          "--eval_steps", "4", "--box_eval_samples", "5", "--per_device_eval_batch_size", "1",
                          "--calibrate_confidence", "false", "--do_eval", "false")],
                  timeout=300, env_extra={"PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    import datasets

    validation = datasets.load_from_disk(str(box_dataset_dir))["validation"]
    expected_first = [list(validation[i]["image"].convert("RGB").getdata())[:4] for i in (0, 3)]
    for rank in (0, 1):  # two ranks really ran, each generating its own shard (3 images, the last padded)
        calls = json.loads((probes / f"rank{rank}.json").read_text())  # the validation, then the test split
        assert all(c["world"] == 2 and c["rank"] == rank for c in calls), calls
        seen = calls[0]
        assert seen["images"] == 3, seen
        assert [list(p) for p in seen["first_pixels"]] == [list(p) for p in expected_first[rank]], rank
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    [evaluation] = [e for e in state["log_history"] if "eval_mean_iou" in e]  # both ranks' shards, gathered
    history = [json.loads(line) for line in (out / "validation" / "history.jsonl").read_text().splitlines()]
    history = [h for h in history if h["split"] == "eval"]  # the final test-split evaluation follows
    assert len(history) == 1  # written once, by the main process
    assert len(history[0]["answers"]) == 5  # the padding repeat was dropped after the gather
    assert (out / "adapter_model.safetensors").is_file()
    assert len(list(out.glob("adapter_model*.safetensors"))) == 1

    # the same model (saved right after that evaluation) in one process gives the same answers in the same order
    answers = _single_process_answers(out, box_dataset_dir, 5)
    assert history[0]["answers"] == answers
    from bbox_sft.metrics import text_metrics

    references = validation.select(range(5))["box"]
    for name, value in text_metrics(answers, references).items():
        assert evaluation[f"eval_{name}"] == pytest.approx(value), name


FSDP2_ON_CPU = """
import json, sys
from pathlib import Path
import torch.distributed as dist
from accelerate.state import PartialState
from accelerate.utils import DistributedType
from torch.distributed.tensor import DTensor
import bbox_sft.train as train
import bbox_sft.validation as validation

generate_answers = validation.generate_answers

def probe(model, *args, **kwargs):  # what the validation generates with, seen from inside the run
    params = list(model.parameters())
    sharded = [p for p in params if isinstance(p, DTensor)]
    Path(sys.argv[1], f"rank{dist.get_rank()}.json").write_text(json.dumps({
        "model": type(model).__name__, "params": len(params), "sharded": len(sharded),
        "local_numel": sum(p.to_local().numel() for p in sharded), "numel": sum(p.numel() for p in sharded),
        "synced_gpus": kwargs.get("synced_gpus"), "world": dist.get_world_size()}))
    return generate_answers(model, *args, **kwargs)

validation.generate_answers = probe
args = train.parse_args(sys.argv[2:])
# accelerate turns FSDP on only for accelerator device types; the gloo CPU group is marked as one,
# everything after this (plugin, fully_shard, training, saving) is accelerate's and TRL's own path
PartialState().distributed_type = DistributedType.MULTI_GPU
train.main(*args)
"""


def test_two_process_fsdp2_shards_the_model_and_validates_like_one_process(tiny_model_dir: Path,
                                                                          box_dataset_dir: Path,
                                                                          tmp_path: Path) -> None:
    out, probes = tmp_path / "fsdp", tmp_path / "probes"
    probes.mkdir()
    script = tmp_path / "fsdp2.py"
    script.write_text(FSDP2_ON_CPU)
    accelerate = str(Path(sys.executable).parent / "accelerate")
    # the shipped FSDP2 config, on 2 CPU processes
    result = _run([accelerate, "launch", "--config_file", "recipes/accelerate/fsdp.yaml", "--num_processes", "2",
                   "--mixed_precision", "no", str(script), str(probes),
                   *_args(tiny_model_dir, box_dataset_dir, out, "--use_peft", "true", "--use_cpu", "true",
                          "--max_steps", "4", "--per_device_train_batch_size", "2", "--eval_strategy", "steps",
                          "--eval_steps", "4", "--box_eval_samples", "5", "--per_device_eval_batch_size", "1")],
                  timeout=300, env_extra={"PYTHONPATH": str(REPO)})  # a rank left waiting hangs: fail instead
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):  # each rank generated with its half of every sharded weight, in step with the other
        seen = json.loads((probes / f"rank{rank}.json").read_text())
        assert seen["world"] == 2 and seen["synced_gpus"] is True
        assert seen["model"].startswith("FSDP"), seen
        assert seen["sharded"] >= seen["params"] // 2, seen
        assert seen["local_numel"] <= seen["numel"] // 2 + seen["sharded"], seen

    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    [evaluation] = [e for e in state["log_history"] if "eval_mean_iou" in e]
    history = [json.loads(line) for line in (out / "validation" / "history.jsonl").read_text().splitlines()]
    history = [h for h in history if h["split"] == "eval"]
    assert len(history) == 1
    # the full adapter, gathered from the shards at save time, answers like the sharded model did
    answers = _single_process_answers(out, box_dataset_dir, 5)
    assert history[0]["answers"] == answers
    import datasets

    from bbox_sft.metrics import text_metrics

    references = datasets.load_from_disk(str(box_dataset_dir))["validation"].select(range(5))["box"]
    for name, value in text_metrics(answers, references).items():
        assert evaluation[f"eval_{name}"] == pytest.approx(value), name


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 300), st.integers(1, 9))
def test_equal_shards_cover_every_index_once(n: int, world: int) -> None:
    from bbox_sft.validation import equal_shard

    shards = [equal_shard(n, rank, world) for rank in range(world)]
    assert len({len(padded) for _, padded in shards}) == 1  # every rank runs the same number of batches
    assert [i for shard, _ in shards for i in shard] == list(range(n))  # in order, each once
    for shard, padded in shards:
        assert padded[: len(shard)] == shard and set(padded) <= set(range(max(n, 1)))


def test_bbox_sft_train_runs_under_accelerate_and_evaluates_the_test_split(tiny_model_dir: Path,
                                                                            box_dataset_dir: Path,
                                                                            tmp_path: Path) -> None:
    out = tmp_path / "cli"
    bbox_sft = str(Path(sys.executable).parent / "bbox-sft")
    result = _run([bbox_sft, "train", "--cpu", "--num_processes", "1",
                   *_args(tiny_model_dir, box_dataset_dir, out, "--use_peft", "true", "--max_steps", "2",
                          "--do_eval", "true", "--box_eval_samples", "0", "--log_level", "info")])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Model parameters ModelConfig(" in result.stdout + result.stderr  # the arguments are logged at start
    results = json.loads((out / "all_results.json").read_text())
    test_size = len(__import__("datasets").load_from_disk(str(box_dataset_dir))["test"])
    assert results["test_samples"] == test_size
    for name in ("test_loss", "test_mean_iou", "test_success@0.5", "test_parse_rate"):
        assert name in results, name
    assert results["test_parse_rate"] == 1.0
    assert (out / "box_confidence.json").is_file() and 0 <= results["test_confidence_ece"] <= 1
    card = (out / "README.md").read_text()
    assert "## Test split (after training)" in card and f"| mean_iou | {results['test_mean_iou']:.4f} |" in card


def test_bbox_sft_train_without_a_recipe_says_how(capsys) -> None:
    from bbox_sft.cli import main as cli

    assert cli(["train", "--cpu"]) == 2


KILLED_AFTER_FIRST_SAVE = """
import os, signal, sys
from transformers import TrainerCallback
import bbox_sft.train as train

class KillAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):  # the checkpoint is on disk: die like a preempted job
        os.kill(os.getpid(), signal.SIGKILL)

make_callbacks = train.make_callbacks
train.make_callbacks = lambda names, script_args: make_callbacks(names, script_args) + [KillAfterSave()]
train.main(*train.parse_args(sys.argv[1:]))
"""


def test_killed_run_resumes_and_continues_its_loss_curve(tiny_model_dir: Path, box_dataset_dir: Path,
                                                          tmp_path: Path) -> None:
    common = ["--max_steps", "6", "--save_strategy", "steps", "--save_steps", "2", "--learning_rate", "1e-3",
              "--warmup_steps", "0", "--per_device_train_batch_size", "4"]
    reference = main(*parse_args(_args(tiny_model_dir, box_dataset_dir, tmp_path / "whole", *common)))
    expected = {e["step"]: e["loss"] for e in reference.state.log_history if "loss" in e}

    out = tmp_path / "killed"
    script = tmp_path / "killed.py"
    script.write_text(KILLED_AFTER_FIRST_SAVE)
    args = [sys.executable, str(script), *_args(tiny_model_dir, box_dataset_dir, out, *common)]
    result = _run(args)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-4").exists()
    assert not (out / "trainer_state.json").exists(), "the run should have been killed before it finished"

    resumed = main(*parse_args(_args(tiny_model_dir, box_dataset_dir, out, *common,
                                     "--resume_from_checkpoint", "true")))
    assert resumed.state.global_step == 6
    got = {e["step"]: e["loss"] for e in resumed.state.log_history if "loss" in e}
    assert sorted(got) == sorted(expected)  # steps 1..6, each once: the curve continues, not restarts
    for step in range(3, 7):  # after the checkpoint the losses match the run that was never stopped
        assert got[step] == pytest.approx(expected[step], rel=0.05), (step, got, expected)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--not_a_field", "1"], "not_a_field"),
        (["--dataset_name", "data/no_such_dataset", "--data_dir", "data/no_such_images", "--synthetic_images", "0"],
         "data_dir data/no_such_images does not exist"),
        (["--use_peft", "true", "--load_in_4bit", "true"], "load_in_4bit (QLoRA) needs a CUDA GPU"),
    ],
    ids=["unknown-key", "missing-dataset", "qlora-on-cpu"],
)
def test_bad_config_is_refused_naming_the_problem(extra, message, tiny_model_dir, box_dataset_dir,
                                                  tmp_path: Path) -> None:
    out = tmp_path / "bad"
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)):
        main(*parse_args(_args(tiny_model_dir, box_dataset_dir, out, *extra)))
    assert not out.exists(), "nothing may be half-written"


def test_unknown_key_in_a_recipe_file_is_named(tmp_path: Path) -> None:
    """The script itself (as ``accelerate launch`` runs it) exits non-zero and names the key."""
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(Path(RECIPE).read_text() + "\nlearning_rat: 0.1\n")
    result = _run([sys.executable, "bbox_sft/train.py", str(recipe)])
    assert result.returncode != 0
    assert "learning_rat" in result.stderr


def test_checkpointing_keeps_the_runs_kwargs_after_a_validation(tiny_model_dir: Path, eight_records: Path,
                                                                  tmp_path: Path) -> None:
    """Validation generates with checkpointing off and turns it back on: with the run's kwargs (here reentrant,
    what LoRA under ZeRO-3 needs), not TRL's default (non-reentrant). Checked on every checkpointed layer."""
    from types import SimpleNamespace

    from bbox_sft.train import build_trainer
    from bbox_sft.validation import reentrant_under_zero3

    trainer = build_trainer(*parse_args(_args(tiny_model_dir, eight_records, tmp_path / "run", "--use_peft", "true",
                                              "--train_merger", "false", "--train_vision_tower", "false",
                                              "--activation_checkpointing", "true", "--activation_checkpointing_kwargs",
                                              '{"use_reentrant": true}', "--eval_strategy", "steps",
                                              "--box_eval_samples", "2", "--max_steps", "1")))

    def reentrant() -> set:
        return {layer._gradient_checkpointing_func.keywords.get("use_reentrant")
                for layer in trainer.model.modules() if getattr(layer, "gradient_checkpointing", False)}

    trainer.train()
    assert reentrant() == {True}
    trainer.evaluate()
    assert reentrant() == {True}
    # LoRA under ZeRO-3 (a plugin as accelerate builds it from zero3.yaml) with checkpointing: reentrant, in the
    # field the Trainer reads; full fine-tuning, ZeRO-2 or no checkpointing: untouched
    for peft, stage, checkpointing, forced in ((True, 3, True, True), (False, 3, True, False),
                                               (True, 2, True, False), (True, 3, False, False)):
        args = SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage),
                               activation_checkpointing=checkpointing, gradient_checkpointing_kwargs=None,
                               activation_checkpointing_kwargs={"every_n_layers": 2})
        reentrant_under_zero3(args, peft)
        assert args.activation_checkpointing_kwargs == (
            {"every_n_layers": 2, "use_reentrant": True} if forced else {"every_n_layers": 2})
