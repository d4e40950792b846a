"""The refer task: data from JSON lines and from a datasets dataset, records, and the reduced demo."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from PIL import Image

from bbox_sft.boxes import Box, iou
from bbox_sft.data.prepare import PrepareArguments, prepare_dataset
from bbox_sft.data.synthetic import write_synthetic_refer
from bbox_sft.formats import format_answer
from bbox_sft.tasks import get_task


@pytest.fixture(scope="module")
def refer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_refer(tmp_path_factory.mktemp("refer"), n=30, seed=5)


def _records(dataset: datasets.DatasetDict) -> dict[tuple[str, str], list[float]]:
    return {(r["image_id"], r["query"]): r["box"] for split in dataset.values() for r in split}


def test_synthetic_expressions_pick_one_of_several_shapes(refer_dir: Path) -> None:
    lines = [json.loads(line) for line in (refer_dir / "refs.jsonl").read_text().splitlines()]
    per_image: dict[str, list[dict]] = {}
    for line in lines:
        per_image.setdefault(line["image"], []).append(line)
    assert len(per_image) == 30
    assert sum(len(v) >= 2 for v in per_image.values()) >= 27  # two or more shapes: the expression matters
    for refs in per_image.values():
        texts = [r["expression"] for r in refs]
        assert all(t.startswith("the ") for t in texts)
        assert len(set(texts)) == len(texts) or "in the middle" in " ".join(texts)


def test_jsonl_and_datasets_sources_give_the_same_records(refer_dir: Path, tmp_path: Path) -> None:
    from_jsonl = prepare_dataset(PrepareArguments(data_dir=str(refer_dir), output_dir=str(tmp_path / "a"),
                                                  task="refer", train_size=100, val_size=100, test_size=100))
    # the same expressions as a datasets dataset in lmms-lab/RefCOCO's schema: one row per box, its
    # expressions as a list in "answer", the box in "bbox" (COCO pixels), the image's file_name
    lines = [json.loads(line) for line in (refer_dir / "refs.jsonl").read_text().splitlines()]
    rows = {"image": [str(refer_dir / line["image"]) for line in lines],
            "answer": [[line["expression"]] for line in lines],
            "bbox": [line["bbox"] for line in lines],
            "file_name": [Path(line["image"]).name for line in lines]}
    hub_like = datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())
    hub_like.save_to_disk(str(tmp_path / "hub_like"))
    from_dataset = prepare_dataset(PrepareArguments(data_dir=str(tmp_path / "hub_like"),
                                                    output_dir=str(tmp_path / "b"), task="refer",
                                                    train_size=100, val_size=100, test_size=100))
    a, b = _records(from_jsonl), _records(from_dataset)
    assert len(a) == len(lines) and a.keys() == b.keys()
    assert all(a[k] == pytest.approx(b[k]) for k in a)
    # each record: the expression in the prompt, the answer its box, every expression of an image in one split
    split_of = {}
    for name, split in from_jsonl.items():
        for r in split:
            assert r["task"] == "refer" and r["query"] in r["prompt"][0]["content"][1]["text"]
            assert r["completion"][0]["content"][0]["text"] == format_answer(r["box"])
            assert split_of.setdefault(r["image_id"], name) == name
    # the box against an independent reading of the line: pixels / image size
    line = lines[0]
    record = next(r for s in from_jsonl.values() for r in s if r["query"] == line["expression"]
                  and r["image_id"] == Path(line["image"]).stem)
    x, y, w, h = line["bbox"]
    expected = Box(x / record["width"], y / record["height"], (x + w) / record["width"], (y + h) / record["height"])
    assert iou(record["box"], expected) > 0.999


def test_bad_lines_are_counted_not_fatal(refer_dir: Path, tmp_path: Path) -> None:
    good = (refer_dir / "refs.jsonl").read_text().splitlines()
    first = json.loads(good[0])
    bad = [
        "not json",
        json.dumps({**first, "expression": "  "}),
        json.dumps({**first, "bbox": [1, 2, 0, 5]}),
        json.dumps({**first, "bbox": "nope"}),
        *(json.dumps({**first, "image": "images/missing.jpg", "expression": f"the shape {k}"}) for k in range(3)),
    ]
    source = tmp_path / "src"
    source.mkdir()
    (source / "images").symlink_to(refer_dir / "images")
    (source / "refs.jsonl").write_text("\n".join(good + bad) + "\n")
    prepare_dataset(PrepareArguments(data_dir=str(source), output_dir=str(tmp_path / "out"), task="refer",
                                     train_size=100, val_size=100, test_size=100))
    report = json.loads((tmp_path / "out" / "build_report.json").read_text())
    assert report["skipped_expressions"] == {"bad_line": 1, "bad_expression": 1, "zero_area": 1, "bad_bbox": 1,
                                             "image_skipped": 3}  # one missing image, three expressions lost
    assert report["skipped"] == {"missing_file": 1}
    assert report["expressions"] == len(good)


def test_a_folder_without_refer_data_names_the_layouts(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no images found for the refer task. Expected a JSON-lines file"):
        prepare_dataset(PrepareArguments(data_dir=str(tmp_path), output_dir=str(tmp_path / "out"), task="refer"))


def test_the_refer_task_asks_and_reads() -> None:
    task = get_task("refer")
    assert task.instruction("the red star") == 'Locate "the red star" and output a JSON bounding box.'
    assert "the red star" in task.native_instruction("the red star")
    with pytest.raises(ValueError, match="needs a query"):
        task.check_query(None)
    assert task.parse(format_answer((0.1, 0.2, 0.5, 0.6))) == pytest.approx((0.1, 0.2, 0.5, 0.6))


def test_the_app_and_predictor_ask_a_refer_model_for_a_description(tiny_model_dir: Path, processor,
                                                                    refer_dir: Path) -> None:
    """A refer model (the tiny base, constrained to one box) in the app's handlers and behind its text box."""
    from transformers import AutoModelForImageTextToText

    from bbox_sft.app import BoxApp, create_app
    from bbox_sft.predict import BoxPredictor

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    predictor = BoxPredictor(model, processor, task="refer")
    images = sorted((refer_dir / "images").glob("*.jpg"))[:2]
    drawn, answer, sentence = BoxApp(predictor).one(str(images[0]), False, "the red star")
    line = json.loads(answer)
    assert line["query"] == "the red star" and line["box"] is not None and drawn is not None
    assert "asked for the red star" in sentence
    _, empty, refused = BoxApp(predictor).one(str(images[0]), False, "  ")
    assert empty == "" and "description of the object" in refused
    results = list(predictor.predict_files(images, query=["the red star", "the blue triangle"]))
    assert [r.to_json()["query"] for r in results] == ["the red star", "the blue triangle"]
    with pytest.raises(ValueError, match="needs a query"):
        predictor.predict([], query=None)
    two = [Image.new("RGB", (64, 48))] * 2
    for asked in (["the red star"], ["the red star"] * 3):  # one query per image, or one for all: nothing else
        with pytest.raises(ValueError, match=f"{len(asked)} queries for 2 images"):
            predictor.predict(two, query=asked)
    page = create_app(predictor, examples=images)
    boxes = [c for c in page.blocks.values() if type(c).__name__ == "Textbox"]
    assert [(b.label, b.visible) for b in boxes] == [("Description of the object", True)]
