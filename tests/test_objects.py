"""Lists of labelled boxes: answer texts, their parser, one-to-one matching and detection metrics."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bbox_sft.boxes import Box
from bbox_sft.detection import detection_metrics, match
from bbox_sft.formats import LabelledBox, format_objects, ordered, parse_objects, quantize

LABELS = ["cat", "dog", "traffic light", 'say "cheese"', "café"]


@st.composite
def objects(draw, max_size: int = 6) -> list[LabelledBox]:
    items = []
    for _ in range(draw(st.integers(0, max_size))):  # boxes at least 0.02 wide and high, as the data has
        x0, y0 = draw(st.floats(0, 0.98)), draw(st.floats(0, 0.98))
        x1, y1 = draw(st.floats(x0 + 0.02, 1)), draw(st.floats(y0 + 0.02, 1))
        items.append(LabelledBox(draw(st.sampled_from(LABELS)), Box(x0, y0, x1, y1)))
    return items


def _quantized(items: list[LabelledBox], answer_format: str) -> list[LabelledBox]:
    return [LabelledBox(o.label, quantize(o.box, answer_format)) for o in ordered(items, answer_format)]


@pytest.mark.parametrize("answer_format", ["json", "qwen"])
@settings(max_examples=150, deadline=None)
@given(items=objects())
def test_parse_reads_back_exactly_what_format_writes_in_answer_order(items, answer_format) -> None:
    text = format_objects(items, answer_format)
    parsed = parse_objects(text)
    assert parsed == _quantized(items, answer_format)
    assert json.loads(text) is not None  # valid JSON, labels escaped
    keys = [(o.box.x_min, o.box.y_min) for o in parsed]
    assert keys == sorted(keys), "ordered by x_min, then y_min"
    assert format_objects(parsed, answer_format) == text, "one right answer text per set of objects"


def test_answer_texts_look_like_the_documented_formats() -> None:
    items = [LabelledBox("dog", Box(0.5, 0.1, 0.9, 0.4)), LabelledBox("cat", Box(0.13, 0.22, 0.54, 0.78))]
    assert format_objects(items) == ('[{"label": "cat", "x_min": 0.13, "y_min": 0.22, "x_max": 0.54, "y_max": 0.78}, '
                                     '{"label": "dog", "x_min": 0.50, "y_min": 0.10, "x_max": 0.90, "y_max": 0.40}]')
    assert format_objects(items, "qwen") == ('[{"bbox_2d": [130, 220, 540, 780], "label": "cat"}, '
                                             '{"bbox_2d": [500, 100, 900, 400], "label": "dog"}]')
    assert format_objects([]) == "[]" and parse_objects("[]") == []


def test_parse_takes_real_style_outputs_and_never_raises() -> None:
    fenced = ('```json\n[\n  {"bbox_2d": [10, 20, 300, 400], "label": "cat"},\n'
              '  {"bbox_2d": [500, 0, 990, 610], "label": "dog"}\n]\n```')
    assert parse_objects(fenced) == [LabelledBox("cat", Box(0.01, 0.02, 0.3, 0.4)),
                                     LabelledBox("dog", Box(0.5, 0.0, 0.99, 0.61))]
    cut = '[{"label": "cat", "x_min": 0.10, "y_min": 0.20, "x_max": 0.30, "y_max": 0.40}, {"label": "dog", "x_m'
    assert parse_objects(cut) == [LabelledBox("cat", Box(0.1, 0.2, 0.3, 0.4))]
    no_label = '[{"x_min": 0.1, "y_min": 0.2, "x_max": 0.3, "y_max": 0.4}]'
    assert parse_objects(no_label) == []
    for text in ("", "none here", "[1, 2, 3]", '{"label": 3}', None, "[{", "[[[["):
        assert parse_objects(text) is None, text


def test_matching_is_one_to_one_by_label_and_prefers_the_best_total_overlap() -> None:
    truth = [LabelledBox("cat", Box(0.0, 0.0, 0.5, 0.5)), LabelledBox("cat", Box(0.4, 0.0, 0.9, 0.5))]
    # the first prediction overlaps both truths; greedy matching by best IoU would strand the second
    predicted = [LabelledBox("cat", Box(0.2, 0.0, 0.7, 0.5)), LabelledBox("cat", Box(0.0, 0.0, 0.45, 0.5))]
    assert sorted(match(predicted, truth, threshold=0.3)) == [(0, 1), (1, 0)]
    assert match([LabelledBox("dog", truth[0].box)], truth) == [], "labels must agree"
    assert match(truth + truth, truth) == [(0, 0), (1, 1)], "each truth matched once"


def test_detection_metrics_on_a_worked_example() -> None:
    cat, dog = Box(0.1, 0.1, 0.4, 0.4), Box(0.5, 0.5, 0.9, 0.9)
    references = [[LabelledBox("cat", cat), LabelledBox("dog", dog)], [], [LabelledBox("cat", cat)]]
    predictions = [[LabelledBox("cat", cat)], [LabelledBox("dog", dog)], None]
    m = detection_metrics(predictions, references)
    assert m["precision@0.5"] == 0.5 and m["recall@0.5"] == pytest.approx(1 / 3)
    assert m["f1@0.5"] == pytest.approx(0.4)
    assert m["count_error_rate"] == 1.0 and m["parse_rate"] == pytest.approx(2 / 3)
    perfect = detection_metrics(references, references)
    assert perfect["map"] == pytest.approx(1.0) and perfect["map_50"] == pytest.approx(1.0)
    assert perfect["f1@0.5"] == 1.0 and perfect["count_error_rate"] == 0.0
    assert 0.0 < m["map"] < 1.0


@settings(max_examples=60, deadline=None)
@given(truth=st.lists(objects(max_size=4), min_size=1, max_size=4), data=st.data())
def test_dropping_a_predicted_box_never_raises_recall(truth, data) -> None:
    full = detection_metrics(truth, truth)
    assert full["recall@0.5"] == 1.0 and full["precision@0.5"] == 1.0
    image = data.draw(st.integers(0, len(truth) - 1))
    if truth[image]:
        fewer = [list(t) for t in truth]
        fewer[image].pop(data.draw(st.integers(0, len(fewer[image]) - 1)))
        less = detection_metrics(fewer, truth)
        assert less["recall@0.5"] < full["recall@0.5"]
        assert less["count_error_rate"] > full["count_error_rate"]


# --- COCO instances files ----------------------------------------------------------------------


def test_synthetic_coco_set_reads_back_with_tight_boxes(tmp_path) -> None:
    import cv2

    from bbox_sft.cli import main as cli
    from bbox_sft.data.coco import read_coco

    assert cli(["synth", "--task", "objects", "--output_dir", str(tmp_path), "--n", "12", "--seed", "3"]) == 0
    coco = read_coco(tmp_path / "annotations.json", tmp_path / "images")
    assert sorted(coco.categories) == ["ellipse", "rectangle", "star", "triangle"] and not coco.skipped
    assert not coco.fixed
    counts = [len(image.objects) for image in coco.images]
    assert len(counts) == 12 and 0 in counts and max(counts) >= 3
    for image in coco.images:  # each box hugs a bright (in value: its hue marks the label) shape on the dark background
        value = cv2.imread(image.path).max(-1)
        shape, bright = value > 105, value > 125  # JPEG blurs a saturated hue's 1-px tips down to ~110
        for obj in image.objects:
            x0, y0, x1, y1 = obj.box.to_pixels(image.width, image.height)  # pixel edges, x1/y1 exclusive
            assert shape[y0:y0 + 2, x0:x1].any() and shape[y1 - 2:y1, x0:x1].any(), "top and bottom edges touch it"
            assert shape[y0:y1, x0:x0 + 2].any() and shape[y0:y1, x1 - 2:x1].any(), "left and right edges touch it"
            ring = np.zeros_like(bright)
            ring[max(0, y0 - 3):y1 + 3, max(0, x0 - 3):x1 + 3] = True
            ring[max(0, y0 - 2):y1 + 2, max(0, x0 - 2):x1 + 2] = False
            assert not (bright & ring).any(), "nothing of the shape 2 px outside its box"
    few = tmp_path / "few"
    assert cli(["synth", "--task", "objects", "--output_dir", str(few), "--n", "12", "--seed", "3",
                "--min_objects", "1", "--max_objects", "2", "--min_size", "0.2", "--max_size", "0.3"]) == 0
    images = read_coco(few / "annotations.json", few / "images").images
    assert {len(image.objects) for image in images} == {1, 2}
    assert min(o.box.x_max - o.box.x_min for i in images for o in i.objects) > 0.15  # stars reach ~0.9 of 2 x 0.2


def test_tiny_tokenizer_spells_the_list_words_whole() -> None:
    """The tiny model's tokenizer knows the list tasks' words (46 tokens for one object, not 58)."""
    from bbox_sft.tiny import CORPUS_LABELS, build_tokenizer

    tokenizer = build_tokenizer()
    for label in CORPUS_LABELS:
        tokens = tokenizer.tokenize(format_objects([LabelledBox(label, Box(0.1, 0.2, 0.3, 0.4))]))
        assert label in tokens and "label" in tokens, tokens


def test_coco_reader_skips_and_counts_what_cannot_be_used(tmp_path) -> None:
    from PIL import Image

    from bbox_sft.data.coco import CocoFormatError, read_coco

    Image.new("RGB", (200, 100)).save(tmp_path / "a.jpg")
    data = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 200, "height": 100},
                   {"id": 2, "file_name": "gone.jpg", "width": 50, "height": 50}],
        "categories": [{"id": 7, "name": "cat"}, {"id": 9, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [20, 10, 100, 50], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 9, "bbox": [150, 50, 100, 100]},  # reaches outside: clipped
            {"id": 3, "image_id": 1, "category_id": 7, "bbox": [10, 10, 100, 50], "iscrowd": 1},
            {"id": 4, "image_id": 1, "category_id": 3, "bbox": [10, 10, 10, 10]},
            {"id": 5, "image_id": 1, "category_id": 7, "bbox": [10, 10, 0, 10]},
            {"id": 6, "image_id": 1, "category_id": 7, "bbox": [300, 10, 10, 10]},  # wholly outside
            {"id": 7, "image_id": 1, "category_id": 7, "bbox": [1, 2, "x", 4]},
            {"id": 8, "image_id": 5, "category_id": 7, "bbox": [1, 2, 3, 4]},
            {"id": 9, "image_id": 2, "category_id": 9, "bbox": [5, 5, 20, 20]},
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(data))
    coco = read_coco(tmp_path / "ann.json", tmp_path)
    first = next(i for i in coco.images if i.image_id == "a")
    assert first.objects == (LabelledBox("cat", Box(0.1, 0.1, 0.6, 0.6)), LabelledBox("dog", Box(0.75, 0.5, 1.0, 1.0)))
    assert coco.skipped == {"crowd": 1, "unknown_category": 1, "zero_area": 1, "outside_image": 1, "bad_bbox": 1,
                            "unknown_image": 1}
    assert dict(first.lost) == {"crowd": 1, "unknown_category": 1, "zero_area": 1, "outside_image": 1, "bad_bbox": 1}
    assert coco.fixed == {"clipped_to_image": 1}
    assert '"id": 3' in coco.examples["crowd"]
    # measured sizes (upright, from the files) win over what the JSON says
    resized = read_coco(tmp_path / "ann.json", tmp_path, sizes={str(tmp_path / "a.jpg"): (400, 200)})
    assert next(i for i in resized.images if i.image_id == "a").objects[0].box == Box(0.05, 0.05, 0.3, 0.3)
    gone = next(i for i in resized.images if i.image_id == "gone")  # not measured: skipped, its box counted
    assert gone.objects == () and dict(gone.lost) == {"image_skipped": 1}
    (tmp_path / "bad.json").write_text('{"images": []}')
    with pytest.raises(CocoFormatError, match="bad.json: not COCO instances JSON"):
        read_coco(tmp_path / "bad.json", tmp_path)
    (tmp_path / "broken.json").write_text('{"images": [')
    with pytest.raises(CocoFormatError, match="broken.json: cannot read COCO JSON"):
        read_coco(tmp_path / "broken.json", tmp_path)


def test_prepare_builds_objects_and_phrase_records_from_coco_and_reports_what_it_skipped(tmp_path) -> None:
    from collections import defaultdict

    from bbox_sft.data import PrepareArguments, prepare_dataset
    from bbox_sft.data.coco import read_coco
    from bbox_sft.tasks import get_task
    record_objects = get_task("objects").target
    from bbox_sft.data.synthetic import write_synthetic_coco
    from bbox_sft.tasks.objects import INSTRUCTION as OBJECTS_INSTRUCTION
    phrase_instruction = get_task("phrase").instruction

    root = write_synthetic_coco(tmp_path / "coco", n=30, seed=5)
    data = json.loads((root / "annotations.json").read_text())
    corrupt = next(i for i in data["images"] if any(a["image_id"] == i["id"] for a in data["annotations"]))
    (root / "images" / corrupt["file_name"]).write_bytes(b"not a jpeg")  # corrupt image, its boxes lost with it
    data["images"].append({"id": 999, "file_name": "gone.jpg", "width": 10, "height": 10})
    data["annotations"] += [{"id": 901, "image_id": 2, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 1},
                            {"id": 902, "image_id": 2, "category_id": 42, "bbox": [0, 0, 5, 5]}]
    (root / "annotations.json").write_text(json.dumps(data))
    truth = {i.image_id: i.objects for i in read_coco(root / "annotations.json", root / "images").images}

    objects = prepare_dataset(PrepareArguments(data_dir=str(root), output_dir=str(tmp_path / "objects"),
                                               task="objects", train_size=20, val_size=5, test_size=5,
                                               visualize=True))
    report = json.loads((tmp_path / "objects" / "build_report.json").read_text())
    assert report["skipped"] == {"unreadable_image": 1, "missing_file": 1}
    lost_with_image = sum(o["category_id"] != 42 and not o.get("iscrowd") for o in data["annotations"]
                          if o["image_id"] == corrupt["id"])
    assert lost_with_image > 0
    assert report["skipped_annotations"] == {"crowd": 1, "unknown_category": 1, "image_skipped": lost_with_image}
    assert report["boxes"]["found"] == len(data["annotations"])
    assert report["boxes"]["kept"] == sum(len(labels) for s in objects for labels in objects[s]["labels"])
    assert report["usable"] == 29 and report["split_sizes"] == {s: len(objects[s]) for s in objects}
    ids = {split: objects[split]["image_id"] for split in objects}
    assert len(set().union(*map(set, ids.values()))) == sum(map(len, ids.values())), "an image in one split only"
    for record in objects["train"]:
        assert record["prompt"][0]["content"][1]["text"] == OBJECTS_INSTRUCTION
        stored, expected = record_objects(record), truth[record["image_id"]]
        assert [o.label for o in stored] == [o.label for o in expected]
        assert np.allclose([o.box for o in stored], [o.box for o in expected], atol=1e-6)
        assert record["completion"][0]["content"][0]["text"] == format_objects(expected)
    assert (tmp_path / "objects" / "preview.png").is_file()
    assert "ellipse, rectangle, star, triangle" in (tmp_path / "objects" / "README.md").read_text()

    phrase = prepare_dataset(PrepareArguments(data_dir=str(root), output_dir=str(tmp_path / "phrase"),
                                              task="phrase", train_size=20, val_size=5, test_size=5))
    for split in phrase:  # the same images in the same splits; one record per category present + 1 absent
        assert set(phrase[split]["image_id"]) == set(ids[split])
        asked = defaultdict(list)
        for record in phrase[split]:
            asked[record["image_id"]].append(record["query"])
            wanted = [o for o in truth[record["image_id"]] if o.label == record["query"]]
            assert record["completion"][0]["content"][0]["text"] == format_objects(wanted)
            assert record["prompt"][0]["content"][1]["text"] == phrase_instruction(record["query"])
        for image_id, queries in asked.items():
            present = {o.label for o in truth[image_id]}
            assert set(queries) >= present and len(queries) == len(present) + 1
    assert any(r[0]["content"][0]["text"] == "[]" for r in phrase["train"]["completion"])


# --- training, validation and prediction on the list tasks --------------------------------------


@pytest.mark.slow
def test_validation_on_objects_logs_the_detection_metrics_of_the_answers_it_wrote(objects_run) -> None:
    from bbox_sft.tasks import get_task
    record_objects = get_task("objects").target

    out, data = objects_run["out"], objects_run["data"]
    logged = next(e for e in objects_run["trainer"].state.log_history if "eval_f1@0.5" in e)
    [record] = [json.loads(line) for line in (out / "validation" / "history.jsonl").read_text().splitlines()]
    truth = [record_objects(r) for r in data["validation"]]
    assert len(record["answers"]) == len(truth) > 0
    expected = detection_metrics([parse_objects(a) for a in record["answers"]], truth, record["object_scores"])
    assert expected["parse_rate"] == 1.0, "120 steps teach the tiny model the list format"
    assert {k: logged[f"eval_{k}"] for k in expected} == pytest.approx(expected)
    saved = json.loads((out / "bbox_sft_args.json").read_text())
    assert saved["task"] == "objects" and saved["labels"] == ["ellipse", "rectangle", "star", "triangle"]
    assert (out / "validation" / "step-000120.png").is_file()
    card = (out / "README.md").read_text()
    assert "Finds every object" in card and "Find every object and output a JSON list" not in card  # full model
    assert f"| f1@0.5 | {logged['eval_f1@0.5']:.4f} |" in card and "| map |" in card


@pytest.mark.slow
def test_predict_lists_objects_readable_by_supervision_and_pycocotools(objects_run, capsys) -> None:
    import supervision as sv
    from pycocotools.coco import COCO

    from bbox_sft.cli import main as cli
    from bbox_sft.predict import BoxPredictor

    out, images = objects_run["out"], objects_run["coco"] / "images"
    assert cli(["predict", "--adapter", str(out), "--dir", str(images)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 40 and all(isinstance(line["objects"], list) for line in lines)
    assert sum(map(len, (line["objects"] for line in lines))) > 0
    for line in lines:  # the documented one call: sv.Detections.from_vlm on the "qwen" field
        found = parse_objects(line["raw"])
        assert [o["label"] for o in line["objects"]] == [o.label for o in found]
        detections = sv.Detections.from_vlm(sv.VLM.QWEN_3_VL, line["qwen"], resolution_wh=(line["width"],
                                                                                            line["height"]))
        assert list(detections.data.get("class_name", [])) == [o.label for o in ordered(found, "qwen")]
        pixels = sorted(tuple(o["box_px"]) for o in line["objects"])  # whole-pixel edges of each box
        assert np.abs(np.sort(detections.xyxy, axis=0) - np.sort(np.array(pixels).reshape(-1, 4), axis=0)).max(
            initial=0) <= 1.0

    predictor = BoxPredictor.from_pretrained(out)
    assert predictor.task.name == "objects"
    with pytest.raises(ValueError, match="takes no query"):
        predictor.predict([], query="star")

    annotations = objects_run["coco"] / "annotations.json"
    assert cli(["predict", "--adapter", str(out), "--dir", str(images), "--format", "coco",
                "--coco_annotations", str(annotations)]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == sum(map(len, (line["objects"] for line in lines)))
    ground_truth = COCO(str(annotations))
    loaded = ground_truth.loadRes(results)  # what COCOeval consumes
    assert len(loaded.getAnnIds()) == len(results)


@pytest.mark.slow
def test_eval_on_objects_scores_adapter_base_and_prior_rows(objects_run, tmp_path) -> None:
    from bbox_sft.cli import main as cli
    from bbox_sft.tasks import get_task
    record_objects = get_task("objects").target

    out, data = objects_run["out"], objects_run["data"]
    assert cli(["eval", "--adapter", str(out), "--dataset", str(out.parent / "objects"), "--split", "validation",
                "--output_dir", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(report["rows"]) == {"adapter", "prior"}, "a full fine-tune has no adapter to turn off"
    lines = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    truth = [record_objects(r) for r in data["validation"]]
    assert [line["image_id"] for line in lines] == data["validation"]["image_id"]
    answers = [parse_objects(x["raw"]) for x in lines]
    scores = [[o["score"] for o in x["objects"]] for x in lines]
    assert all(0 < s <= 1 for row in scores for s in row)
    assert report["rows"]["adapter"] == pytest.approx(detection_metrics(answers, truth, scores))
    assert "mean count per image" in report["prior"]
    # the prior from the train split, computed here: its mean count of boxes, at its mean box, its commonest labels
    train = data["train"]
    boxes = [b for bs in train["boxes"] for b in bs]
    labels = [label for ls in train["labels"] for label in ls]
    count, mean = round(len(boxes) / len(train)), Box(*np.asarray(boxes, dtype=float).mean(0))
    common = [label for label, _ in Counter(labels).most_common()]
    guess = [LabelledBox(common[i % len(common)], mean) for i in range(count)]
    assert count >= 1 and report["rows"]["prior"] == pytest.approx(detection_metrics([guess] * len(truth), truth))
    assert (tmp_path / "eval" / "grid.png").is_file() and "f1@0.5" in (tmp_path / "eval" / "report.md").read_text()


@pytest.mark.slow
def test_the_app_handlers_show_an_objects_model_s_list_like_predict(objects_run, capsys) -> None:
    from bbox_sft.app import BoxApp
    from bbox_sft.cli import main as cli
    from bbox_sft.predict import BoxPredictor

    out, image = objects_run["out"], sorted((objects_run["coco"] / "images").iterdir())[1]
    assert cli(["predict", "--adapter", str(out), "--image", str(image)]) == 0
    expected = {**json.loads(capsys.readouterr().out.splitlines()[-1]), "image": image.name}
    app = BoxApp(BoxPredictor.from_pretrained(out))
    drawn, answer, sentence = app.one(str(image))
    assert json.loads(answer) == expected and drawn.size == (expected["width"], expected["height"])
    assert f"{len(expected['objects'])} object(s)" in sentence
    _, jsonl, summary = app.many([str(image), str(image.with_name("missing.jpg"))])
    lines = [json.loads(line) for line in open(jsonl)]
    assert lines[0] == expected and "missing_file" not in lines[1] and "no such file" in lines[1]["error"]
    # the app's model answers under the saved run's grammar: its labels and its bound, read back from the folder
    saved = json.loads((out / "bbox_sft_args.json").read_text())
    assert (app.predictor.labels, app.predictor.max_objects) == (saved["labels"], saved["max_objects"])
    assert app.predictor.constrained and saved["labels"] and saved["max_objects"]


@pytest.mark.parametrize("answer_format", ["json", "qwen"])
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_a_phrase_answer_can_only_name_the_category_asked(tokenizers, answer_format, data) -> None:
    """Any walk through a phrase model's grammar for the query "cat" names cats only (the task's own spec, as a
    vLLM server builds it too), though the run knows more labels."""
    from bbox_sft.tasks import get_task

    task = get_task("phrase")
    spec = task.grammar_spec(answer_format, LABELS, "cat", 3)
    assert spec.labels == ("cat",)
    grammar, tokenizer = spec.build(tokenizers["qwen"]), tokenizers["qwen"]
    ids: list[int] = []
    while not ids or ids[-1] != grammar.eos:
        ids.append(data.draw(st.sampled_from(grammar.allowed(ids))))
    found = parse_objects(tokenizer.decode(ids, skip_special_tokens=True))
    assert found is not None and {o.label for o in found} <= {"cat"}



def test_a_recipe_whose_task_does_not_match_the_dataset_is_refused_naming_the_field(tiny_model_dir, tmp_path) -> None:
    from pathlib import Path

    from bbox_sft.data import PrepareArguments, prepare_dataset
    from bbox_sft.data.synthetic import write_synthetic_coco
    from bbox_sft.train import build_trainer, parse_args

    root = write_synthetic_coco(tmp_path / "coco", n=12, seed=4)
    prepare_dataset(PrepareArguments(data_dir=str(root), output_dir=str(tmp_path / "phrase"), task="phrase",
                                     train_size=8, val_size=2, test_size=2))
    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "tiny_cpu.yaml")
    args = [recipe, "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(tmp_path / "phrase"),
            "--output_dir", str(tmp_path / "run"), "--build_tiny_model", "false"]
    with pytest.raises(ValueError, match="task is 'objects' but .* holds 'phrase' records: set task: phrase"):
        build_trainer(*parse_args([*args, "--task", "objects"]))
    with pytest.raises(ValueError, match="task is 'subject'"):
        build_trainer(*parse_args(args))
    assert not (tmp_path / "run").exists(), "refused before the output folder is written"
    assert build_trainer(*parse_args([*args, "--task", "phrase"])).train_dataset[0]["task"] == "phrase"


# --- constrained decoding of lists ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizers():
    from bbox_sft.tiny import build_qwen_tokenizer, build_tokenizer

    return {"tiny": build_tokenizer(), "qwen": build_qwen_tokenizer()}


@pytest.mark.parametrize("which", ["tiny", "qwen"])
@pytest.mark.parametrize("answer_format", ["json", "qwen"])
@settings(max_examples=40, deadline=None)
@given(items=objects(max_size=4))
def test_the_list_grammar_writes_exactly_what_the_tokenizer_encodes(tokenizers, which, answer_format, items) -> None:
    from bbox_sft.grammar import ListGrammar

    tokenizer = tokenizers[which]
    grammar = ListGrammar(tokenizer, LABELS, answer_format, max_objects=4)
    ids = grammar.compose(items)
    assert ids == tokenizer(format_objects(items, answer_format), add_special_tokens=False)["input_ids"]
    for t, token in enumerate(ids):  # every training answer is a walk the grammar allows
        assert token in grammar.allowed(ids[:t])
    assert grammar.allowed(ids) == [grammar.eos]


@pytest.mark.parametrize("which", ["tiny", "qwen"])
@pytest.mark.parametrize("answer_format", ["json", "qwen"])
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_any_walk_through_the_list_grammar_is_an_ordered_list_of_known_labels(tokenizers, which, answer_format,
                                                                              data) -> None:
    from bbox_sft.grammar import ListGrammar

    tokenizer = tokenizers[which]
    grammar = ListGrammar(tokenizer, LABELS, answer_format, max_objects=3)
    ids: list[int] = []
    while not ids or ids[-1] != grammar.eos:
        ids.append(data.draw(st.sampled_from(grammar.allowed(ids))))
        assert len(ids) < 400, "every walk ends"
    found = parse_objects(tokenizer.decode(ids, skip_special_tokens=True))
    assert found is not None and len(found) <= 3
    assert all(o.label in LABELS and o.box.x_max > o.box.x_min and o.box.y_max > o.box.y_min for o in found)
    assert [o.box.x_min for o in found] == sorted(o.box.x_min for o in found)


def test_saliency_masks_give_objects_records_one_per_large_component(tmp_path) -> None:
    import cv2

    from bbox_sft.data import PrepareArguments, prepare_dataset

    images, masks = tmp_path / "set" / "images", tmp_path / "set" / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    for i in range(6):
        cv2.imwrite(str(images / f"m{i}.png"), np.full((100, 200, 3), 40 * i, np.uint8))
        mask = np.zeros((100, 200), np.uint8)
        mask[10:50, 20:60] = 255  # 40x40
        mask[60:90, 150:190] = 255  # 30x40: kept (0.75 of the largest)
        mask[5:8, 190:193] = 255 if i % 2 else 0  # a 3x3 speck: left out
        cv2.imwrite(str(masks / f"m{i}.png"), mask)
    data = prepare_dataset(PrepareArguments(data_dir=str(tmp_path / "set"), output_dir=str(tmp_path / "out"),
                                            task="objects", train_size=6, val_size=0, test_size=0))
    for record in data["train"]:
        assert record["labels"] == ["object", "object"] and record["task"] == "objects"
        assert np.allclose(record["boxes"], [[0.1, 0.1, 0.3, 0.5], [0.75, 0.6, 0.95, 0.9]])
        assert record["completion"][0]["content"][0]["text"] == (
            '[{"label": "object", "x_min": 0.10, "y_min": 0.10, "x_max": 0.30, "y_max": 0.50}, '
            '{"label": "object", "x_min": 0.75, "y_min": 0.60, "x_max": 0.95, "y_max": 0.90}]')
    assert "Object boxes from saliency masks" in (tmp_path / "out" / "README.md").read_text()
    with pytest.raises(FileNotFoundError, match="no images found for the phrase task. Expected a COCO annotation file"):
        prepare_dataset(PrepareArguments(data_dir=str(tmp_path / "set"), output_dir=str(tmp_path / "p"), task="phrase"))



@pytest.mark.parametrize("answer_format", ["json", "qwen"])
def test_object_scores_come_from_the_decisions_that_wrote_each_object(tokenizers, answer_format) -> None:
    import torch

    from bbox_sft.decoding import decision_logprobs
    from bbox_sft.grammar import ListGrammar

    grammar = ListGrammar(tokenizers["tiny"], LABELS, answer_format)
    items = [LabelledBox("cat", Box(0.1, 0.2, 0.3, 0.4)), LabelledBox("dog", Box(0.5, 0.1, 0.9, 0.6))]
    ids = grammar.compose(items) + [grammar.eos]
    vocab = len(tokenizers["tiny"])
    # the first object's label is decided before its numbers in json, after them in qwen
    first_label = (0,) if answer_format == "json" else (0, 1)
    sure, torn = [], []
    for t, token in enumerate(ids):
        logits = torch.zeros(vocab)
        logits[token] = 20.0  # the model is sure of every token it wrote ...
        sure.append(logits)
        state = grammar.state_of(ids[:t])
        if state.node is not None and len(grammar.allowed(ids[:t])) > 1 and state.items in first_label:
            logits = torch.zeros(vocab)  # ... or torn over the connector decisions of the first object
        torn.append(logits)
    assert grammar.object_scores(ids, decision_logprobs(grammar, ids, sure)) == pytest.approx([1.0, 1.0], abs=1e-6)
    first, second = grammar.object_scores(ids, decision_logprobs(grammar, ids, torn))
    assert first < 0.97 and second > 0.99  # a geometric mean: the sure digits of the first object count too


@pytest.mark.parametrize("which", ["tiny", "qwen"])
@pytest.mark.parametrize("answer_format", ["json", "qwen"])
def test_each_decision_counts_toward_the_object_it_writes(tokenizers, which, answer_format) -> None:
    """Three objects, every decision of its own log-probability; each object's score is the geometric mean of its
    decisions, assigned here from the text written up to and with the decision's token: in json an object's
    decisions run from the choice that there is one more (and its label) to its last digit, so a decision's
    object is the number of objects closed ("}") by then, and the final "no more" counts for none; in qwen the
    label follows the numbers, so an object's decisions run from its first digit through its label and whether
    another follows: the objects opened ("bbox_2d") by then, less one."""
    import math

    from bbox_sft.grammar import ListGrammar

    tokenizer = tokenizers[which]
    grammar = ListGrammar(tokenizer, LABELS, answer_format)
    items = [LabelledBox("cat", Box(0.1, 0.2, 0.3, 0.4)), LabelledBox("dog", Box(0.15, 0.1, 0.9, 0.6)),
             LabelledBox("cat", Box(0.5, 0.05, 0.75, 0.95))]
    ids = grammar.compose(items) + [grammar.eos]
    decisions = {t: -0.01 * (t + 1) for t in range(len(ids)) if len(grammar.allowed(ids[:t])) > 1}
    assert len(decisions) > 12
    owned: dict[int, list[float]] = {}
    for t, value in decisions.items():
        written = tokenizer.decode(ids[: t + 1])  # a token may hold the brace and the choice ("},")
        k = written.count("}") if answer_format == "json" else max(0, written.count("bbox_2d") - 1)
        if k < len(items):
            owned.setdefault(k, []).append(value)
    expected = [math.exp(sum(v) / len(v)) for _, v in sorted(owned.items())]
    assert grammar.object_scores(ids, decisions) == pytest.approx(expected, rel=1e-9)


def test_a_list_dataset_built_in_json_is_rewritten_for_a_qwen_recipe(tmp_path) -> None:
    from bbox_sft.data import PrepareArguments, prepare_dataset
    from bbox_sft.tasks import get_task
    record_objects = get_task("objects").target
    from bbox_sft.data.synthetic import write_synthetic_coco
    from bbox_sft.train import with_answer_format

    root = write_synthetic_coco(tmp_path / "coco", n=10, seed=6)
    data = prepare_dataset(PrepareArguments(data_dir=str(root), output_dir=str(tmp_path / "objects"), task="objects",
                                            train_size=8, val_size=1, test_size=1))
    rewritten = with_answer_format(data, "qwen")
    for record in rewritten["train"]:
        text = record["completion"][0]["content"][0]["text"]
        assert text == format_objects(record_objects(record), "qwen") and ("bbox_2d" in text or text == "[]")
    assert with_answer_format(data, "json") is data, "nothing to rewrite"
