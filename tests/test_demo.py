"""The reduced demos end to end: the same command as `make demo DEMO_PROFILE=...`, smaller sizes.

The three run as background processes from the start of the session (``demo_runs`` in conftest.py) and are
checked here, last. Their answers do not depend on the load beside them, only on the pinned kernels and
thread counts (:data:`bbox_sft.demo.PINNED_CPU`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _finished(demo_runs: dict, profile: str) -> tuple[dict, Path]:
    """The report of a demo once its process has ended (a failed demo fails with the end of its log)."""
    process, folder = demo_runs[profile]
    code = process.wait(timeout=3600)
    assert code == 0, f"make demo DEMO_PROFILE={profile} failed ({code}):\n" + (folder / "demo.log").read_text()[-4000:]
    return json.loads((folder / "outputs" / "report.json").read_text()), folder


def test_fast_demo_runs_every_stage_and_the_adapter_beats_the_center_prior(demo_runs) -> None:
    report, tmp_path = _finished(demo_runs, "fast")
    out = tmp_path / "outputs"
    rows = report["rows"]
    assert set(rows) == {"adapter", "base (no adapter)", "base, native grounding prompt", "center prior"}
    assert rows["adapter"]["parse_rate"] == 1.0
    confidence = report["confidence"]  # calibrated at the end of LoRA training, scored on the test split
    assert confidence["calibrated_on"] == 40 and 0 <= confidence["confidence_ece"] <= 1
    assert rows["adapter"]["mean_iou"] >= rows["center prior"]["mean_iou"] + 0.1, rows
    assert [e["step"] for e in report["validation"]] == [50, 100]
    for name in ("report.md", "report.json", "validation_curve.png", "test_predictions.png", "predictions.jsonl"):
        assert (out / name).is_file(), name
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 8 and all(p["box"] is not None for p in predictions)
    assert "base model: full fine-tuning on domain A" in report["stage_seconds"]


def test_objects_fast_demo_runs_every_stage_of_the_objects_task(demo_runs) -> None:
    """The objects profile in miniature: synthetic COCO sets, base, LoRA, eval rows, labelled predictions."""
    from bbox_sft.demo import PROFILES
    from bbox_sft.detection import DETECTION_METRIC_NAMES

    report, tmp_path = _finished(demo_runs, "objects_fast")
    out, data = tmp_path / "outputs", tmp_path / "data"
    assert json.loads((data / "domain_b" / "build_report.json").read_text())["task"] == "objects"
    assert json.loads((out / "lora" / "bbox_sft_args.json").read_text())["task"] == "objects"
    rows = report["rows"]
    assert set(rows) == {"adapter", "base (no adapter)", "prior"}
    assert all(set(DETECTION_METRIC_NAMES) <= set(row) for row in rows.values()), rows
    assert rows["adapter"]["parse_rate"] == rows["base (no adapter)"]["parse_rate"] == 1.0
    assert "(the mean count per image) at the mean box" in report["prior"], report["prior"]
    steps = PROFILES["objects_fast"].lora_steps, PROFILES["objects_fast"].eval_steps
    assert [e["step"] for e in report["validation"]] == list(range(steps[1], steps[0] + 1, steps[1]))
    assert "| model | precision@0.5 |" in (out / "report.md").read_text()
    for name in ("report.md", "report.json", "validation_curve.png", "test_predictions.png", "predictions.jsonl"):
        assert (out / name).is_file(), name
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 8 and all(isinstance(p["objects"], list) for p in predictions)
    labels = {o["label"] for p in predictions for o in p["objects"]}
    assert labels <= {"ellipse", "rectangle", "triangle", "star"}, labels


def test_refer_fast_demo_runs_every_stage_of_the_refer_task(demo_runs) -> None:
    """The refer profile in miniature: expressions on 2-3 shapes, base, LoRA, eval rows (with Qwen's RefCOCO
    wording), predictions for the held-out images' own expressions."""
    report, tmp_path = _finished(demo_runs, "refer_fast")
    out, data = tmp_path / "outputs", tmp_path / "data"
    assert json.loads((out / "lora" / "bbox_sft_args.json").read_text())["task"] == "refer"
    rows = report["rows"]
    assert set(rows) == {"adapter", "base (no adapter)", "base, Qwen's RefCOCO prompt", "center prior"}
    assert rows["adapter"]["parse_rate"] == 1.0
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["task"] == "refer" and "{query}" in metrics["native_prompt"]["instruction"]
    evaluated = [json.loads(line) for line in (out / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert evaluated and all(line["query"].startswith("the ") for line in evaluated)
    assert len({line["image_id"] for line in evaluated}) < len(evaluated)  # several expressions per image
    questions = [json.loads(line) for line in (data / "heldout_b" / "refs.jsonl").read_text().splitlines()]
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["query"] for p in predictions] == [q["expression"] for q in questions]
    assert all(p["box"] is not None for p in predictions)


def test_grpo_demo_compares_grpo_with_more_sft_from_the_fast_demos_adapter(demo_runs, tmp_path) -> None:
    """`make demo DEMO_PROFILE=grpo` in miniature, from the fast demo's adapter: both methods get the same
    training time, stop at an evaluated checkpoint, and are scored with the starting adapter on the test split."""
    from bbox_sft.demo_rl import run_rl_demo

    sft, folder = _finished(demo_runs, "fast")
    out = tmp_path / "rl"
    report = run_rl_demo(seconds=5, output_dir=str(out), sft_dir=str(folder / "outputs"),
                         data_dir=str(folder / "data"))
    rows = report["rows"]
    assert set(rows) == {"adapter", "continued_sft", "grpo"}
    assert rows["adapter"] == sft["rows"]["adapter"]  # the starting adapter, scored again: the same figures
    for name, run in report["training"].items():
        assert run["steps"] >= 1 and 5 <= run["train_seconds"] < 5 + 60, (name, run)
        assert run["kept_step"] in [step for step, _ in run["validation"]], (name, run)
        assert [step for step, _ in run["validation"]][-1] == run["steps"]  # the budget's last step evaluated
        assert rows[name]["parse_rate"] == 1.0
    assert report["training"]["grpo"]["rewards"] and not report["training"]["continued_sft"]["rewards"]
    assert json.loads((out / "grpo" / "bbox_sft_args.json").read_text())["method"] == "grpo"
    assert (out / "grpo_curves.png").is_file() and "| GRPO |" in (out / "report.md").read_text()
