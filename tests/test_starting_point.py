"""A training run that starts from an earlier run: its adapter trained further (or merged, with a new LoRA), the
recipe's LoRA fields refused where they would be ignored, and a time budget that stops training at a saved,
evaluated step (how continued SFT gets the same wall time as GRPO)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch

from bbox_sft.starting_point import StartingPoint

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "tiny_cpu.yaml")


def _args(adapter_dir: Path, dataset: Path, out: Path, *extra: str) -> list[str]:
    return [RECIPE, "--model_name_or_path", str(adapter_dir), "--dataset_name", str(dataset), "--output_dir",
            str(out), "--use_peft", "true", "--train_vision_tower", "false", "--train_merger", "false",
            "--build_tiny_model", "false", "--image_min_side", "128", "--image_max_side", "160",
            "--disable_tqdm", "true", "--warmup_steps", "0", *extra]


def test_what_model_name_or_path_names(adapter_dir, tiny_model_dir) -> None:
    adapter = StartingPoint.resolve(str(adapter_dir))
    base = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert (adapter.adapter, adapter.base, adapter.run.task.name) == (adapter_dir, base, "subject")
    full = StartingPoint.resolve(base)  # the fully fine-tuned base: a run without an adapter
    assert (full.adapter, full.base, full.run.task.name) == (None, base, "subject")
    plain = StartingPoint.resolve(str(tiny_model_dir))
    assert (plain.adapter, plain.run) == (None, None)
    hub = StartingPoint.resolve("Qwen/Qwen3-VL-2B-Instruct")  # offline: a model id, loaded by from_pretrained
    assert (hub.base, hub.adapter) == ("Qwen/Qwen3-VL-2B-Instruct", None)


def test_continued_sft_trains_the_adapter_further_and_stops_at_its_time_budget(adapter_dir, box_dataset_dir,
                                                                              tmp_path) -> None:
    from bbox_sft.train import main as train
    from bbox_sft.train import parse_args

    out = tmp_path / "more"
    trainer = train(*parse_args(_args(adapter_dir, box_dataset_dir, out, "--max_steps", "10000",
                                      "--max_train_seconds", "4", "--eval_strategy", "steps", "--eval_steps", "10000",
                                      "--save_strategy", "steps", "--save_steps", "10000", "--box_eval_samples", "4",
                                      "--per_device_eval_batch_size", "4", "--logging_steps", "10000")))
    stopped = trainer.state.global_step
    assert 1 <= stopped < 10000
    logs = trainer.state.log_history
    assert [e["step"] for e in logs if "eval_mean_iou" in e] == [stopped]  # the stop step evaluated,
    assert (out / f"checkpoint-{stopped}" / "adapter_model.safetensors").is_file()  # and saved
    assert next(e["train_runtime"] for e in logs if "train_runtime" in e) < 4 + 30  # soon after the budget
    assert [e["step"] for e in logs if "loss" in e] == [stopped]  # and logged: its losses are not lost
    sft, more = (json.loads((folder / "adapter_config.json").read_text()) for folder in (adapter_dir, out))
    assert (more["r"], more["lora_alpha"], more["base_model_name_or_path"]) == (
        sft["r"], sft["lora_alpha"], sft["base_model_name_or_path"])
    run = json.loads((out / "bbox_sft_args.json").read_text())
    assert run["method"] == "sft" and run["started_from"] == str(adapter_dir)
    assert run["training"].startswith(f"the SFT adapter {adapter_dir} trained further")
    assert (out / "training_curves.png").stat().st_size > 10_000


def test_lora_fields_that_an_adapter_trained_further_would_ignore_are_refused(adapter_dir, box_dataset_dir,
                                                                            tmp_path) -> None:
    from bbox_sft.train import build_trainer, parse_args

    with pytest.raises(ValueError, match="lora_r set, but .* trains further"):
        build_trainer(*parse_args(_args(adapter_dir, box_dataset_dir, tmp_path, "--lora_r", "4")))
    with pytest.raises(ValueError, match="train_merger set"):
        build_trainer(*parse_args(_args(adapter_dir, box_dataset_dir, tmp_path)[:-2] + [
            "--train_merger", "true", "--warmup_steps", "0"]))


def test_a_merged_adapter_under_a_new_lora_answers_as_the_adapter_did(adapter_dir, box_dataset_dir, tmp_path) -> None:
    """merge_adapter: the base with the adapter folded in, a new zero-initialised LoRA on top: before any step its
    logits are the adapter's own, loaded as inference loads it."""
    from bbox_sft.predict import load_for_inference
    from bbox_sft.train import build_trainer, parse_args

    trainer = build_trainer(*parse_args(_args(adapter_dir, box_dataset_dir, tmp_path, "--merge_adapter", "true",
                                              "--lora_r", "4", "--lora_alpha", "8")))
    model = trainer.model
    assert model.peft_config["default"].r == 4
    assert trainer.card_info["training"].startswith("a new LoRA on ") and "merged in" in trainer.card_info["training"]
    reference, processor = load_for_inference(adapter_dir)
    record = datasets.load_from_disk(str(box_dataset_dir))["test"][0]
    text = processor.apply_chat_template(record["prompt"], add_generation_prompt=True)
    batch = processor(text=[text], images=[[record["image"].convert("RGB")]], return_tensors="pt")
    with torch.no_grad():
        model.eval()
        ours, theirs = model(**batch).logits, reference.eval()(**batch).logits
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
