"""``bbox-sft label``: a folder in, a dataset out in each layout the tools import, read back by our own readers.

The objects model of the session (``objects_run``) labels the synthetic COCO set's photos; each export is read
back by ``bbox-sft prepare`` (and the COCO file by pycocotools) and compared with the answers in
``labels.jsonl`` to the rounding each layout imposes, computed here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BBOX_SFT = str(Path(sys.executable).parent / "bbox-sft")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def photos(objects_run: dict, tmp_path_factory) -> Path:
    """The synthetic COCO set's photos, and three files no model can read."""
    folder = tmp_path_factory.mktemp("photos")
    for path in sorted((objects_run["coco"] / "images").iterdir())[:24]:
        shutil.copy(path, folder / path.name)
    (folder / "notes.jpg").write_text("not an image\n")
    (folder / "empty.png").write_bytes(b"")
    (folder / "torn.jpg").write_bytes((objects_run["coco"] / "images" / sorted(
        p.name for p in (objects_run["coco"] / "images").iterdir())[0]).read_bytes()[:300])
    return folder


@pytest.fixture(scope="module")
def labelled(objects_run: dict, photos: Path, tmp_path_factory) -> dict[str, Path]:
    """The photos labelled once per layout (the same model, the same answers)."""
    from bbox_sft.data.writers import DatasetWriter
    from bbox_sft.labelling import LabelArguments, label_folder
    from bbox_sft.predict import BoxPredictor

    root = tmp_path_factory.mktemp("labelled")
    predictor = BoxPredictor.from_pretrained(objects_run["out"])
    out = {}
    shard_size, DatasetWriter.max_shard_size = DatasetWriter.max_shard_size, "100KB"  # 24 photos: several files
    try:
        for layout in ("coco", "yolo", "voc", "hf"):
            out[layout] = root / layout
            label_folder(LabelArguments(adapter=str(objects_run["out"]), dir=str(photos), output=str(out[layout]),
                                        format=layout), predictor)
    finally:
        DatasetWriter.max_shard_size = shard_size
    return out


def _ledger(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "labels.jsonl").read_text().splitlines()]


def _voc_rounded(box: list[float], width: int, height: int) -> list[float]:
    """What whole, 1-based inclusive pixels keep of a box: edges rounded to the pixel, read back 0-based."""
    x0, y0, x1, y1 = box[0] * width, box[1] * height, box[2] * width, box[3] * height
    xmin, ymin = round(x0 + 1), round(y0 + 1)
    xmax, ymax = max(round(x1), xmin), max(round(y1), ymin)
    return [(xmin - 1) / width, (ymin - 1) / height, xmax / width, ymax / height]


@pytest.mark.parametrize("layout", ["coco", "yolo", "voc", "hf"])
def test_what_label_writes_prepare_reads_back_as_the_same_boxes(labelled, layout: str, tmp_path: Path) -> None:
    """Every image and box of the answers, back from the export through our own reader: labels exactly, boxes to
    the layout's rounding (COCO and datasets: pixels as floats; YOLO: 5 decimals of centre and size; VOC: whole
    pixels, computed here); the unreadable files named, counted by reason, and left out."""
    from bbox_sft.data import PrepareArguments, prepare_dataset

    folder = labelled[layout]
    answers = {Path(e["image"]).stem: e for e in _ledger(folder) if "error" not in e}
    report = json.loads((folder / "label_report.json").read_text())
    assert report["unreadable"] == {"unreadable_image": 3} and report["labelled"] == len(answers) == 24
    assert sorted(Path(f["image"]).name for f in report["unreadable_files"]) == ["empty.png", "notes.jpg", "torn.jpg"]
    source = folder / "dataset" if layout == "hf" else folder
    if layout == "hf":  # written in several Arrow files, read back as one split
        assert len(list((source / "train").glob("data-*.arrow"))) > 1
    dataset = prepare_dataset(PrepareArguments(data_dir=str(source), output_dir=str(tmp_path / "back"),
                                               task="objects"))
    records = {r["image_id"]: r for split in dataset.values() for r in split}
    assert records.keys() == answers.keys()
    boxes = 0
    for stem, entry in answers.items():
        record = records[stem]
        assert record["labels"] == [name for name, _, _ in entry["objects"]], (layout, stem)
        width, height = entry["width"], entry["height"]
        expected = [_voc_rounded(b, width, height) if layout == "voc" else b for _, b, _ in entry["objects"]]
        tolerance = {"coco": 1e-6, "yolo": 2e-5, "voc": 1e-9, "hf": 1e-6}[layout]
        assert np.allclose(np.reshape(record["boxes"], (-1, 4)), np.reshape(expected, (-1, 4)), atol=tolerance), (
            layout, stem, record["boxes"], expected)
        boxes += len(expected)
    assert boxes == report["boxes"] > 20 and sum(report["boxes_per_label"].values()) == boxes


def test_the_coco_file_loads_in_pycocotools_with_ids_and_scores(labelled) -> None:
    from pycocotools.coco import COCO

    folder = labelled["coco"]
    coco = COCO(str(folder / "annotations.json"))
    answers = [e for e in _ledger(folder) if "error" not in e]
    assert len(coco.getImgIds()) == len(answers)
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == json.loads(
        (folder / "label_report.json").read_text())["classes"]
    for image in coco.loadImgs(coco.getImgIds()):
        entry = next(e for e in answers if e["name"] == image["file_name"])
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        assert [a["score"] for a in annotations] == [score for _, _, score in entry["objects"]]
        assert [coco.loadCats(a["category_id"])[0]["name"] for a in annotations] == [n for n, _, _ in entry["objects"]]
        assert (folder / "images" / image["file_name"]).read_bytes() == Path(entry["image"]).read_bytes()


def test_scores_sit_where_each_layout_has_a_place_for_them(labelled) -> None:
    import datasets

    answers = {e["name"]: e for e in _ledger(labelled["yolo"]) if "error" not in e}
    for layout in ("yolo", "voc"):
        lines = [json.loads(line) for line in (labelled[layout] / "scores.jsonl").read_text().splitlines()]
        assert {line["image"]: line["scores"] for line in lines} == {
            name: [s for _, _, s in e["objects"]] for name, e in answers.items()}
    rows = datasets.load_from_disk(str(labelled["hf"] / "dataset"))["train"]
    scores = {name: [s for _, _, s in e["objects"]] for name, e in answers.items()}
    raw = rows.cast_column("image", datasets.Image(decode=False))
    assert len(raw) == len(scores)
    for row in raw:
        assert row["objects"]["score"] == pytest.approx(scores[row["image"]["path"]], abs=1e-6)


def test_min_confidence_and_review_below_at_their_boundaries(labelled, objects_run, photos, tmp_path) -> None:
    """A box scored exactly at --min_confidence is kept, below it dropped (and counted); an image whose lowest score
    equals --review_below is not listed, one below it is; the export is written again from the same answers."""
    from bbox_sft.labelling import LabelArguments, label_folder

    folder = tmp_path / "again"
    shutil.copytree(labelled["coco"], folder)
    answers = [e for e in _ledger(folder) if "error" not in e]
    scores = sorted(s for e in answers for _, _, s in e["objects"])
    threshold = scores[len(scores) // 2]
    lowest = sorted(min(s for _, _, s in e["objects"]) for e in answers if e["objects"])
    review_at = lowest[len(lowest) // 2]
    report = label_folder(LabelArguments(adapter=str(objects_run["out"]), dir=str(photos), output=str(folder),
                                         format="coco", resume=True, min_confidence=threshold, review_below=review_at))
    assert report["dropped_below_min_confidence"] == sum(s < threshold for s in scores) > 0
    assert report["boxes"] == sum(s >= threshold for s in scores)
    kept = json.loads((folder / "annotations.json").read_text())["annotations"]
    assert min(a["score"] for a in kept) == threshold and len(kept) == report["boxes"]
    reviewed = [json.loads(line) for line in (folder / "review.jsonl").read_text().splitlines()]
    assert {Path(r["image"]).name for r in reviewed} == {
        e["name"] for e in answers if e["objects"] and min(s for _, _, s in e["objects"]) < review_at}
    assert report["review"] == len(reviewed) > 0 and (folder / "review.png").is_file()
    assert all(r["lowest_score"] < review_at for r in reviewed)


def _run(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([BBOX_SFT, "label", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, **kwargs)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and p.name not in ("label_report.json",)}


@pytest.mark.parametrize("layout", ["coco", "hf"])
def test_a_run_killed_midway_resumes_into_the_same_files(objects_run, photos, tmp_path, layout: str) -> None:
    """Killed (SIGKILL) with part of the folder done and its last line cut short, then --resume: every image once,
    none skipped, and every file byte for byte what an uninterrupted run writes."""
    common = ["--adapter", str(objects_run["out"]), "--dir", str(photos), "--format", layout, "--batch_size", "1"]
    whole = _run([*common, "--output", str(tmp_path / "whole")])
    stopped = _run([*common, "--output", str(tmp_path / "stopped")])
    ledger = tmp_path / "stopped" / "labels.jsonl"
    deadline = time.monotonic() + 300
    while not (ledger.is_file() and ledger.read_text().count("\n") >= 6) and time.monotonic() < deadline:
        assert stopped.poll() is None, stopped.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    os.killpg(stopped.pid, signal.SIGKILL)
    stopped.wait()
    done = ledger.read_text().count("\n")
    assert 6 <= done < 27, "stopped midway"
    with open(ledger, "a") as f:
        f.write('{"image": "half a line')  # what a kill in the middle of a write leaves
    assert not (tmp_path / "stopped" / "label_report.json").exists()
    resumed = _run([*common, "--output", str(tmp_path / "stopped"), "--resume", "true"])
    assert resumed.wait(timeout=600) == 1 and whole.wait(timeout=600) == 1, resumed.stderr.read().decode()[-2000:]
    images = [json.loads(line)["image"] for line in ledger.read_text().splitlines()]
    assert sorted(images) == sorted(set(images)) and len(images) == 27  # every file once
    assert _files(tmp_path / "stopped") == _files(tmp_path / "whole")
    with pytest.raises(subprocess.CalledProcessError):  # a second run into a labelled folder needs --resume
        subprocess.run([BBOX_SFT, "label", *common, "--output", str(tmp_path / "whole")], check=True,
                       capture_output=True)


def test_a_phrase_model_labels_each_category_asked(objects_run, photos, tmp_path) -> None:
    """Each --query category asked of every image; the boxes labelled by the category, the classes the queries."""
    from bbox_sft.labelling import LabelArguments, label_folder
    from bbox_sft.predict import BoxPredictor

    predictor = BoxPredictor.from_pretrained(objects_run["out"], task="phrase")
    labels = predictor.labels[:2]
    report = label_folder(LabelArguments(adapter=str(objects_run["out"]), dir=str(photos), output=str(tmp_path / "p"),
                                         format="yolo", query=labels), predictor)
    assert report["classes"] == labels and set(report["boxes_per_label"]) <= set(labels)
    for entry in _ledger(tmp_path / "p"):
        if "error" not in entry:
            asked = [predictor.predict_files([entry["image"]], query=q) for q in labels]
            expected = [(q, list(o.box)) for q, results in zip(labels, asked) for r in results
                        for o in r.prediction.objects]
            assert [(name, box) for name, box, _ in entry["objects"]] == expected
