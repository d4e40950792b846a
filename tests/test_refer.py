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


# --- RefCOCO as the benchmark it is: its own splits, the protocol, the table -------------------------------


def _refcoco_like(refer_dir: Path, folder: Path, names: tuple[str, ...]) -> dict[str, list[dict]]:
    """The synthetic expressions in a RefCOCO copy's exact schema (lmms-lab/RefCOCO: question_id, image, question,
    answer: a ref's sentences, segmentation, bbox: COCO pixels, iscrowd, file_name), the images dealt to the
    split ``names`` in turn; two sentences per ref. Saved with save_to_disk; returns the rows per split."""
    lines = [json.loads(line) for line in (refer_dir / "refs.jsonl").read_text().splitlines()]
    images = sorted({line["image"] for line in lines})
    split_of = {image: names[k % len(names)] for k, image in enumerate(images)}
    rows: dict[str, list[dict]] = {name: [] for name in names}
    for k, line in enumerate(lines):
        rows[split_of[line["image"]]].append({
            "question_id": str(k), "image": str(refer_dir / line["image"]),
            "question": "Please carefully observe the area circled in the image and come up with a caption.",
            "answer": [line["expression"], line["expression"].removeprefix("the ")],
            "segmentation": [], "bbox": [float(v) for v in line["bbox"]], "iscrowd": 0,
            "file_name": Path(line["image"]).name})
    features = datasets.Features({"question_id": datasets.Value("string"), "image": datasets.Image(),
                                  "question": datasets.Value("string"),
                                  "answer": datasets.List(datasets.Value("string")),
                                  "segmentation": datasets.List(datasets.Value("float32")),
                                  "bbox": datasets.List(datasets.Value("float32")), "iscrowd": datasets.Value("int8"),
                                  "file_name": datasets.Value("string")})
    datasets.DatasetDict({name: datasets.Dataset.from_list(r, features=features) for name, r in rows.items()}
                         ).save_to_disk(str(folder))
    return rows


@pytest.fixture(scope="module")
def refcoco_sets(refer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("refcoco")
    return {"lmms": (root / "RefCOCO", _refcoco_like(refer_dir, root / "RefCOCO", ("val", "test", "testA", "testB"))),
            "other": (root / "RefCOCOg", _refcoco_like(refer_dir, root / "RefCOCOg", ("train", "validation", "testB")))}


@pytest.mark.parametrize("copy", ["lmms", "other"])
def test_a_refcoco_copy_keeps_its_own_splits_every_sentence_a_record(refcoco_sets, tmp_path: Path, copy: str) -> None:
    """Each split of the source stays that split (val is validation; testA, testB are kept), no image changes
    split; each sentence of a ref is a record of its own (lmms-eval scores each), its box the ref's COCO pixels
    over the image's size."""
    folder, rows = refcoco_sets[copy]
    dataset = prepare_dataset(PrepareArguments(data_dir=str(folder), output_dir=str(tmp_path / copy), task="refer",
                                               train_size=100, val_size=100, test_size=100))
    ours = {"val": "validation"}
    assert set(dataset) == {"train", "validation", "test"} | {ours.get(n, n) for n in rows}
    report = json.loads((tmp_path / copy / "build_report.json").read_text())
    for name, source in rows.items():
        split = dataset[ours.get(name, name)]
        expected = {(Path(r["file_name"]).stem, sentence) for r in source for sentence in r["answer"]}
        assert {(r["image_id"], r["query"]) for r in split} == expected, name
        assert report["split_records"][ours.get(name, name)] == len(expected) == 2 * len(source)
        for record in split:
            row = next(r for r in source if Path(r["file_name"]).stem == record["image_id"] and record["query"] in
                       r["answer"])
            x, y, w, h = row["bbox"]
            W, H = record["width"], record["height"]
            assert record["box"] == pytest.approx([x / W, y / H, (x + w) / W, (y + h) / H], abs=1e-6)
    assert report["source_splits"] == [ours.get(n, n) for n in rows]


def test_each_refcoco_split_is_cut_to_its_size_and_counted(refcoco_sets, tmp_path: Path) -> None:
    folder, rows = refcoco_sets["lmms"]
    dataset = prepare_dataset(PrepareArguments(data_dir=str(folder), output_dir=str(tmp_path / "cut"), task="refer",
                                               train_size=100, val_size=3, test_size=2))
    report = json.loads((tmp_path / "cut" / "build_report.json").read_text())
    assert report["split_sizes"] == {"train": 0, "validation": 3, "test": 2, "testA": 2, "testB": 2}
    assert len(set(dataset["testA"]["image_id"])) == 2 and len(dataset["train"]) == 0


def _acc(lines: list[dict], key: str = "box") -> float:
    """Acc@0.5 from predictions.jsonl lines, computed here: IoU of the written box with the truth, >= 0.5."""
    def overlap(a, b) -> float:
        if a is None:
            return 0.0
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
        return w * h / union

    return sum(overlap(line[key], line["truth"]) >= 0.5 for line in lines) / len(lines)


def test_one_eval_writes_the_benchmark_table_of_every_split(refcoco_sets, adapter_dir: Path, tmp_path: Path) -> None:
    """Two RefCOCO copies, given raw (built first, their splits kept), scored by the subject adapter asked as a refer
    model (--task, as for a model with no saved run): Acc@0.5 per split for each row and the mean over the splits
    (each split once, not pooled), equal to what the predictions give computed here; NAME:SPLITS picks a dataset's
    splits; --limit scores the first N of each split and says so; a split the source lacks is refused, naming
    the ones it has."""
    from bbox_sft.evaluation import EvalArguments, evaluate_adapter

    lmms, other = refcoco_sets["lmms"][0], refcoco_sets["other"][0]
    out = tmp_path / "table"
    rows = evaluate_adapter(EvalArguments(adapter=str(adapter_dir), task="refer", split="all", output_dir=str(out),
                                          dataset=[str(lmms), f"{other}:val,testB"], native_baseline=True))
    table = json.loads((out / "table.json").read_text())
    columns = ["RefCOCO validation", "RefCOCO test", "RefCOCO testA", "RefCOCO testB", "RefCOCOg validation",
               "RefCOCOg testB", "average"]
    assert table["columns"] == columns and set(rows) == {"adapter", "base (no adapter)",
                                                         "base, Qwen's RefCOCO prompt", "center prior"}
    keys = {"adapter": "box", "base (no adapter)": "base_box"}
    sizes = {}
    for column in columns[:-1]:
        name, split = column.split(" ")
        lines = [json.loads(line) for line in (out / name / split / "predictions.jsonl").read_text().splitlines()]
        sizes[column] = len(lines)
        assert table["evaluated"][column] == len(lines) == 2 * len(refcoco_sets["lmms" if name == "RefCOCO" else
                                                                                 "other"][1][
            {"validation": "val"}.get(split, split) if name == "RefCOCO" else split])
        for row, key in keys.items():
            assert rows[row][column] == pytest.approx(_acc(lines, key)), (row, column)
    assert len(set(sizes.values())) > 1 and any(rows["adapter"][c] > 0 for c in columns[:-1]), (sizes, rows)
    for row in rows:
        assert rows[row]["average"] == pytest.approx(sum(rows[row][c] for c in columns[:-1]) / 6)
    assert "Acc@0.5" in (out / "table.md").read_text() and "--limit" not in table["caption"]
    quick = evaluate_adapter(EvalArguments(adapter=str(adapter_dir), task="refer", dataset=[str(lmms)],
                                           split="val,testA", output_dir=str(tmp_path / "quick"), limit=3))
    table = json.loads((tmp_path / "quick" / "table.json").read_text())
    assert table["evaluated"] == {"RefCOCO validation": 3, "RefCOCO testA": 3} and set(quick["adapter"]) == {
        "RefCOCO validation", "RefCOCO testA", "average"}
    assert "first 3 records of each split (--limit 3)" in table["caption"]
    with pytest.raises(ValueError, match=r"has no split 'testC' \(it has \['train', 'validation', 'test', 'testA', "
                                         r"'testB'\]\)"):
        evaluate_adapter(EvalArguments(adapter=str(adapter_dir), task="refer", dataset=[str(lmms)],
                                       split="val,testC", output_dir=str(tmp_path / "refused")))
