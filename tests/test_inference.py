"""Generation-based validation, constrained decoding, eval, predict, merge and the Hub folder."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import evaluate
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

import bbox_sft.iou_metric
from bbox_sft.boxes import Box
from bbox_sft.calibration import chance_ece
from bbox_sft.cli import main as cli
from bbox_sft.decoding import generate_answers
from bbox_sft.formats import format_answer, parse_answer
from bbox_sft.grammar import BoxGrammar as AnswerGrammar
from bbox_sft.metrics import box_metrics
from bbox_sft.train import main as train
from bbox_sft.train import parse_args

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "tiny_cpu.yaml")


def _train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [RECIPE, "--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(out),
            "--image_min_side", "128", "--image_max_side", "160", "--build_tiny_model", "false",
            "--disable_tqdm", "true", "--per_device_eval_batch_size", "8", *extra]


# --- metrics ---------------------------------------------------------------------------------


def test_success_counts_an_iou_of_exactly_the_threshold() -> None:
    truth = [(0.0, 0.0, 1.0, 1.0)] * 2
    m = box_metrics([(0.0, 0.0, 0.5, 1.0), (0.0, 0.0, 0.75, 1.0)], truth)  # IoU exactly 0.5 and 0.75
    assert m["success@0.5"] == 1.0 and m["success@0.75"] == 0.5


def test_metrics_count_unparsed_answers_as_zero() -> None:
    truth = [(0.0, 0.0, 0.5, 0.5), (0.2, 0.2, 0.6, 0.6), (0.0, 0.0, 1.0, 1.0), (0.1, 0.1, 0.2, 0.2)]
    predicted = [(0.0, 0.0, 0.5, 0.5), (0.2, 0.2, 0.6, 0.5), None, (0.5, 0.5, 0.6, 0.6)]
    m = box_metrics(predicted, truth)
    assert m["mean_iou"] == pytest.approx((1 + 0.75 + 0 + 0) / 4)
    assert m["median_iou"] == pytest.approx(0.375)
    assert m["success@0.5"] == 0.5 and m["success@0.75"] == 0.5 and m["parse_rate"] == 0.75


def test_evaluate_wrapper_gives_the_same_numbers() -> None:
    metric = evaluate.load(bbox_sft.iou_metric.__file__)
    answers = [format_answer((0.1, 0.2, 0.5, 0.6)), "no box", '{"bbox_2d": [0, 0, 500, 500]}']
    truth = [[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.5, 0.5]]
    assert metric.compute(predictions=answers, references=truth) == pytest.approx(
        box_metrics([parse_answer(a) for a in answers], truth))


# --- constrained decoding --------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.data(), st.sampled_from(["json", "qwen"]))
def test_any_walk_through_the_grammar_is_a_valid_answer(processor, data, answer_format: str) -> None:
    grammar = AnswerGrammar(processor.tokenizer, answer_format)
    tokens: list[int] = []
    while (allowed := grammar.allowed(tokens)) != [grammar.eos]:
        tokens.append(data.draw(st.sampled_from(allowed)))
        assert len(tokens) < 80
    # the raw text, not the parsed box: the parser clamps to [0, 1] and orders corners, which would hide a bad grammar
    text = processor.tokenizer.decode(tokens)
    if answer_format == "json":
        match = re.fullmatch(r'\{"x_min": (\d\.\d\d), "y_min": (\d\.\d\d), "x_max": (\d\.\d\d), "y_max": (\d\.\d\d)\}',
                             text)
        top = 1.0
    else:
        number = r"(0|[1-9]\d{0,3})"
        match = re.fullmatch(r'\{"bbox_2d": \[' + ", ".join([number] * 4) + r"\]\}", text)
        top = 1000
    assert match, text
    x0, y0, x1, y1 = (float(v) for v in match.groups())
    assert 0 <= x0 < x1 <= top and 0 <= y0 < y1 <= top, text  # ordered and never zero-area


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=4, max_size=4), st.sampled_from(["json", "qwen"]))
def test_the_grammar_accepts_every_training_answer(processor, values, answer_format: str) -> None:
    grammar = AnswerGrammar(processor.tokenizer, answer_format)
    box = (*sorted(values[0::2])[:1], *sorted(values[1::2])[:1], *sorted(values[0::2])[1:], *sorted(values[1::2])[1:])
    target = processor.tokenizer(format_answer(box, answer_format), add_special_tokens=False)["input_ids"]
    for i, token in enumerate(target):
        assert token in grammar.allowed(target[:i])
    assert grammar.allowed(target) == [grammar.eos]


@pytest.mark.slow
def test_constrained_decoding_parses_every_answer_of_an_untrained_model(tiny_model_dir, box_dataset_dir,
                                                                         processor) -> None:
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    split = datasets.load_from_disk(str(box_dataset_dir))
    images = [image for name in ("train", "validation", "test") for image in split[name]["image"]][:50]
    assert len(images) == 50
    for answer_format in ("json", "qwen"):
        predictions = generate_answers(model, processor, images, answer_format=answer_format, batch_size=16,
                                       progress=False)
        assert all(p.box is not None for p in predictions), [p.raw for p in predictions if p.box is None]
        assert all(0 <= p.box.x_min <= p.box.x_max <= 1 and 0 <= p.box.y_min <= p.box.y_max <= 1
                   for p in predictions)
        assert all(0 <= p.spread < 1 and p.confidence is None for p in predictions), [  # no calibration given
            (p.raw, p.spread) for p in predictions if not (p.spread is not None and 0 <= p.spread < 1)]
    raw = generate_answers(model, processor, images[:8], constrained=False, max_new_tokens=24, progress=False)
    assert box_metrics([p.box for p in raw], [(0, 0, 1, 1)] * 8)["parse_rate"] < 1.0  # off: reported as it is


# --- validation during training --------------------------------------------------------------


@pytest.mark.slow
def test_validation_logs_box_metrics_and_best_checkpoint_follows_mean_iou(tiny_model_dir, box_dataset_dir,
                                                                          tmp_path) -> None:
    out = tmp_path / "val"
    trainer = train(*parse_args(_train_args(
        tiny_model_dir, box_dataset_dir, out, "--max_steps", "30", "--learning_rate", "2e-3", "--eval_strategy",
        "steps", "--eval_steps", "10", "--save_strategy", "steps", "--save_steps", "10", "--save_total_limit", "5",
        "--metric_for_best_model", "eval_mean_iou", "--greater_is_better", "true", "--load_best_model_at_end",
        "true", "--box_eval_samples", "10", "--logging_steps", "5")))
    evals = [e for e in trainer.state.log_history if "eval_mean_iou" in e]
    assert [e["step"] for e in evals] == [10, 20, 30]
    for e in evals:
        for key in ("eval_mean_iou", "eval_median_iou", "eval_success@0.5", "eval_success@0.75", "eval_parse_rate"):
            assert 0.0 <= e[key] <= 1.0
        assert e["eval_parse_rate"] == 1.0
    best = max(evals, key=lambda e: e["eval_mean_iou"])
    assert trainer.state.best_metric == pytest.approx(best["eval_mean_iou"])
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best['step']}")
    assert sorted(p.name for p in (out / "validation").glob("*.png")) == [
        "step-000010.png", "step-000020.png", "step-000030.png", "test-step-000030.png"]  # then the test split
    card = (out / "README.md").read_text()
    assert "base_model:" in card
    # the card describes the saved model: the best checkpoint's evaluation, not the last one
    assert f"best checkpoint, step {best['step']}, by eval_mean_iou" in card
    assert f"| mean_iou | {best['eval_mean_iou']:.4f} |" in card


# --- predict, eval, merge, plain peft ---------------------------------------------------------


@pytest.fixture
def image_folder(synthetic_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for path in sorted((synthetic_dir / "DUTS-TR" / "DUTS-TR-Image").glob("*.jpg"))[:4]:
        shutil.copy(path, folder / path.name)
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return folder


@pytest.mark.slow
def test_predict_on_a_folder_reports_the_corrupt_image_and_goes_on(adapter_dir, image_folder, tmp_path,
                                                                    capsys) -> None:
    code = cli(["predict", "--adapter", str(adapter_dir), "--dir", str(image_folder), "--output", str(tmp_path / "o")])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1  # the run went on, and the exit code says one file failed
    assert len(lines) == 5
    bad = [line for line in lines if "error" in line]
    assert [Path(line["image"]).name for line in bad] == ["corrupt.jpg"]
    good = [line for line in lines if "error" not in line]
    assert (adapter_dir / "box_confidence.json").is_file()  # calibrated at the end of training
    from bbox_sft.predict import BoxPredictor

    predicted = {r.path: r.prediction for r in BoxPredictor.from_pretrained(adapter_dir).predict_files(
        [line["image"] for line in good])}
    assert any(p.confidence != p.spread for p in predicted.values())  # so a swap of the two would show
    for line in good:
        assert set(line) == {"image", "box", "box_px", "confidence", "spread", "raw"}
        assert 0 <= line["confidence"] <= 1 and 0 <= line["spread"] < 1
        mine = predicted[line["image"]]  # each field in its own place, from the prediction itself
        assert (line["confidence"], line["spread"], line["raw"]) == (round(mine.confidence, 4),
                                                                    round(mine.spread, 4), mine.raw)
        width, height = Image.open(line["image"]).size
        x0, y0, x1, y1 = line["box_px"]
        assert 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height
    assert len(list((tmp_path / "o").glob("*.png"))) == 4


@pytest.mark.slow
def test_eval_reports_three_rows_and_skips_a_corrupt_record(adapter_dir, box_dataset_dir, tmp_path) -> None:
    dataset = datasets.load_from_disk(str(box_dataset_dir))
    test = dataset["test"].cast_column("image", datasets.Image(decode=False))
    rows = test.to_list()
    rows[1]["image"] = {"bytes": b"broken", "path": None}
    test_split = datasets.Dataset.from_list(rows, features=test.features)
    broken = datasets.DatasetDict({"train": dataset["train"], "test": test_split})
    broken.save_to_disk(str(tmp_path / "data"))
    out = tmp_path / "eval"
    assert cli(["eval", "--adapter", str(adapter_dir), "--dataset", str(tmp_path / "data"), "--split", "test",
                "--output_dir", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert set(report["rows"]) == {"adapter", "base (no adapter)", "base, native grounding prompt", "center prior"}
    assert report["evaluated"] == len(rows) - 1
    # the center prior is the train split's mean box (never the scored split's own), scored on the kept records
    train_mean = np.asarray(dataset["train"]["box"], dtype=float).mean(0)
    assert not np.allclose(train_mean, np.asarray(dataset["test"]["box"], dtype=float).mean(0), atol=1e-3)
    assert report["center_prior_box"] == pytest.approx(train_mean.tolist())
    kept = [Box(*r["box"]) for k, r in enumerate(rows) if k != 1]
    assert report["rows"]["center prior"] == pytest.approx(box_metrics([Box(*train_mean)] * len(kept), kept))
    assert set(report["confidence"]) >= {"confidence_ece", "calibrated_on"} and (out / "reliability.png").is_file()
    assert [s["image_id"] for s in report["skipped"]] == [rows[1]["image_id"]]
    assert report["rows"]["adapter"]["parse_rate"] == 1.0
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == len(rows) - 1
    assert all("native_raw" in p and "base_raw" in p for p in predictions)
    # ECE beside what a perfectly calibrated confidence shows by chance on these very confidences
    chance = chance_ece([p["confidence"] for p in predictions])
    measured = report["confidence"]["confidence_ece_chance"], report["confidence"]["confidence_ece_chance_p90"]
    assert measured == pytest.approx(chance, abs=1e-3)  # predictions.jsonl rounds confidences to 4 places
    text = (out / "report.md").read_text()
    assert "center prior" in text and f"would show {measured[0]:.3f} on as many images by chance" in text
    assert Image.open(out / "grid.png").size[0] > 0


PLAIN_PEFT = """
import json, sys
import torch
from peft import PeftModel
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

adapter, *paths = sys.argv[1:]
base_id = json.load(open(adapter + "/adapter_config.json"))["base_model_name_or_path"]
model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base_id), adapter).eval()
processor = AutoProcessor.from_pretrained(adapter)
messages = [{"role": "user", "content": [{"type": "image"},
             {"type": "text", "text": "Find the main subject and output a JSON bounding box."}]}]
text = processor.apply_chat_template(messages, add_generation_prompt=True)
for path in paths:
    inputs = processor(text=[text], images=[Image.open(path).convert("RGB")], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=64, do_sample=False)
    print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
"""


@pytest.mark.slow
def test_plain_peft_code_gives_the_same_boxes_as_predict(adapter_dir, image_folder, tmp_path, capsys) -> None:
    paths = sorted(str(p) for p in image_folder.glob("synth*.jpg"))
    script = tmp_path / "plain.py"
    script.write_text(PLAIN_PEFT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    plain = subprocess.run([sys.executable, str(script), str(adapter_dir), *paths], capture_output=True, text=True,
                           env=env, cwd=tmp_path, check=True).stdout.splitlines()
    assert cli(["predict", "--adapter", str(adapter_dir), "--dir", str(image_folder), "--constrained", "false",
                "--batch_size", "1"]) == 1
    ours = [json.loads(line) for line in capsys.readouterr().out.splitlines() if "error" not in line]
    assert [o["raw"] for o in ours] == plain
    assert all(o["box"] is not None for o in ours), "the adapter should have learnt the answer format"


@pytest.mark.slow
def test_merge_writes_a_model_that_loads_without_peft(adapter_dir, tmp_path) -> None:
    assert cli(["merge", "--adapter", str(adapter_dir), "--output", str(tmp_path / "merged")]) == 0
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_merge_adds_each_update_in_fp32_and_keeps_the_bases_dtype(tiny_model_dir, tmp_path) -> None:
    """A bf16 base (as Qwen3-VL ships): the merged weight is the fp32 sum rounded once, W + scale * B @ A, saved in
    bf16 like its base, on any device (merging in bf16 rounds the update before adding it)."""
    from bbox_sft.model import LANGUAGE_LORA_TARGETS
    from bbox_sft.predict import merge_adapter
    from bbox_sft.tiny import save_random_lora

    base = tmp_path / "bf16-base"
    AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(base)
    AutoProcessor.from_pretrained(tiny_model_dir).save_pretrained(base)
    lora = save_random_lora(base, tmp_path / "lora", {"task": "subject"}, target_modules=LANGUAGE_LORA_TARGETS)
    merged = AutoModelForImageTextToText.from_pretrained(merge_adapter(lora, tmp_path / "merged"), dtype="auto")
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    adapter = load_file(lora / "adapter_model.safetensors")
    name = next(k for k in adapter if "layers.0.self_attn.q_proj.lora_A" in k)
    a, b = adapter[name], adapter[name.replace("lora_A", "lora_B")]
    config = json.loads((lora / "adapter_config.json").read_text())
    weight = AutoModelForImageTextToText.from_pretrained(base, dtype="auto").model.language_model.layers[
        0].self_attn.q_proj.weight
    expected = (weight.float() + config["lora_alpha"] / config["r"] * (b.float() @ a.float())).to(torch.bfloat16)
    assert torch.equal(merged.model.language_model.layers[0].self_attn.q_proj.weight, expected)


def test_missing_adapter_exits_non_zero_naming_it(tmp_path, caplog) -> None:
    assert cli(["predict", "--adapter", str(tmp_path / "nope"), "--image", "x.jpg"]) != 0
    assert "nope" in caplog.text


# --- the Hub folder --------------------------------------------------------------------------


@pytest.mark.slow
def test_adapter_folder_is_what_would_be_uploaded(adapter_dir, tiny_model_dir, tmp_path, caplog) -> None:
    card = (adapter_dir / "README.md").read_text()
    meta = card.split("---")[1]
    assert f"base_model: {adapter_dir.parent / 'base'}" in meta and "library_name: peft" in meta
    assert "PeftModel.from_pretrained" in card
    for name in ("adapter_config.json", "adapter_model.safetensors", "processor_config.json", "tokenizer.json"):
        assert (adapter_dir / name).is_file(), name
    before = sorted(p.name for p in adapter_dir.iterdir())
    assert cli(["push", "--adapter", str(adapter_dir), "--repo_id", "someone/tiny-bbox"]) == 1
    assert "someone/tiny-bbox" in caplog.text and "Nothing is lost" in caplog.text
    assert sorted(p.name for p in adapter_dir.iterdir()) == before


def test_bad_image_bytes_are_caught_by_decode(tmp_path) -> None:
    from bbox_sft.evaluation import decode_records

    good = io.BytesIO()
    Image.new("RGB", (8, 8)).save(good, format="PNG")
    features = datasets.Features({"image": datasets.Image(), "image_id": datasets.Value("string")})
    split = datasets.Dataset.from_list([{"image": {"bytes": good.getvalue(), "path": None}, "image_id": "a"},
                                        {"image": {"bytes": b"xx", "path": None}, "image_id": "b"}], features=features)
    kept, skipped = decode_records(split)
    assert [r["image_id"] for r in kept] == ["a"] and [s["image_id"] for s in skipped] == ["b"]


@pytest.mark.slow
def test_adapter_on_a_base_it_does_not_fit_exits_naming_both(adapter_dir, tmp_path, caplog) -> None:
    from bbox_sft.tiny import save_tiny_model

    other = save_tiny_model(tmp_path / "other-base", hidden_size=64, layers=1)
    code = cli(["predict", "--adapter", str(adapter_dir), "--image", "x.jpg", "--base", str(other)])
    assert code != 0
    assert "does not fit base model" in caplog.text and str(other) in caplog.text


def test_an_adapter_given_as_a_hub_repo_id_loads_from_the_hub_cache(adapter_dir, image_folder, tmp_path, capsys,
                                                                     caplog, monkeypatch) -> None:
    """``--adapter owner/name`` goes through huggingface_hub.snapshot_download (here: its offline cache)."""
    import huggingface_hub

    from bbox_sft.cli import main as cli

    snapshot = tmp_path / "hub" / "models--someone--tiny-bbox" / "snapshots" / ("0" * 40)
    shutil.copytree(adapter_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    assert huggingface_hub.constants.HF_HUB_OFFLINE
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # what HF_HUB_CACHE sets

    def predict(adapter: str) -> tuple[int, str]:
        rc = cli(["predict", "--adapter", adapter, "--dir", str(image_folder)])
        return rc, capsys.readouterr().out

    (rc, by_id), (rc_folder, by_folder) = predict("someone/tiny-bbox"), predict(str(adapter_dir))
    assert rc == rc_folder == 1  # the folder holds a corrupt image: its line says so, the rest are answered
    assert by_id.count("\n") == len(list(image_folder.iterdir())) and by_id == by_folder
    assert predict("someone/not-there")[0] == 2
    assert "adapter someone/not-there: no such local folder" in caplog.text
