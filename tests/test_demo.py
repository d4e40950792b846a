"""The reduced demo end to end: the same commands as `make demo`, smaller sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bbox_sft.demo import run_demo

pytestmark = pytest.mark.slow


def test_fast_demo_runs_every_stage_and_the_adapter_beats_the_center_prior(tmp_path: Path) -> None:
    report = run_demo("fast", output_dir=str(tmp_path / "outputs"), data_dir=str(tmp_path / "data"))
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
