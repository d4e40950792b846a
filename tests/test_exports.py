"""Detection exports in every layout a tool writes: the same images and boxes give the same records.

One small scene set (pixel boxes on a 4 px / 3 px grid, so every layout's numbers are exact) is
written as a COCO file, a Roboflow COCO root (train/ valid/ test/ with a placeholder category), a
YOLO export (data.yaml, images/ + labels/ per split), a Roboflow YOLO export (``../train/images``),
Pascal VOC (Annotations/ + JPEGImages/ + ImageSets/Main) and a ``datasets`` detection set. The
expected records are computed here from the pixel boxes, not by the readers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bbox_sft.boxes import Box
from bbox_sft.formats import LabelledBox, format_objects

W, H = 400, 300
NAMES = ["cat", "dog", "bird"]
SPLIT_OF = {"train": "train", "validation": "valid", "test": "test"}


def scenes() -> list[tuple[str, str, list[tuple[str, tuple[int, int, int, int]]]]]:
    """(file stem, split, [(label, (x, y, w, h) pixels)]): one image of 40 birds in train, one with none."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(9):
        split = ["train", "train", "train", "train", "train", "validation", "validation", "test", "test"][i]
        objects = []
        for _ in range(int(rng.integers(1 if i != 4 else 0, 4 if i != 4 else 1))):
            x, y = 4 * int(rng.integers(0, 70)), 3 * int(rng.integers(0, 70))
            objects.append((NAMES[int(rng.integers(0, 3))], (x, y, 4 * int(rng.integers(3, 30)),
                                                             3 * int(rng.integers(3, 30)))))
        out.append((f"scene_{i:02d}", split, objects))
    crowd = [("bird", (4 * (k % 10) * 10, 3 * (k // 10) * 25, 32, 60)) for k in range(40)]
    out.append(("crowd_40", "train", crowd))
    return out


def _clip(x, y, w, h) -> tuple[int, int, int, int]:
    return x, y, min(x + w, W), min(y + h, H)


def expected(scene) -> list[LabelledBox]:
    """The answer's objects, computed from the pixels: clipped, normalised, in the answer's order."""
    objects = []
    for label, box in scene[2]:
        x0, y0, x1, y1 = _clip(*box)
        objects.append(LabelledBox(label, Box(x0 / W, y0 / H, x1 / W, y1 / H)))
    return objects


def _image(path: Path, i: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((H, W, 3), 40 + 10 * i, np.uint8)).save(path, quality=90)


def write_coco(root: Path, items, split_folders: bool) -> None:
    groups = {SPLIT_OF[s]: [it for it in items if it[1] == s] for s in SPLIT_OF} if split_folders else {"": items}
    for folder, group in groups.items():
        base = root / folder
        categories = [{"id": k + 1, "name": n, "supercategory": "animals"} for k, n in enumerate(NAMES)]
        if split_folders:  # Roboflow's placeholder: the project's name, no boxes
            categories.insert(0, {"id": 0, "name": "animals-project", "supercategory": "none"})
        images, annotations = [], []
        for stem, _, objects in group:
            images.append({"id": len(images), "file_name": f"{stem}.jpg", "width": W, "height": H})
            for label, box in objects:
                annotations.append({"id": len(annotations), "image_id": images[-1]["id"], "iscrowd": 0,
                                    "category_id": NAMES.index(label) + 1, "bbox": list(box)})
        name = "_annotations.coco.json" if split_folders else "annotations.json"
        base.mkdir(parents=True, exist_ok=True)
        (base / name).write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
        image_dir = base if split_folders else base / "images"  # Roboflow: the photos beside the file
        image_dir.mkdir(exist_ok=True)
        for stem, _, _ in group:
            shutil.copy(root.parent / "pixels" / f"{stem}.jpg", image_dir / f"{stem}.jpg")


def write_yolo(root: Path, items, roboflow: bool) -> None:
    yolo_split = {"train": "train", "validation": "val", "test": "test"}
    for stem, split, objects in items:
        images = root / SPLIT_OF[split] / "images" if roboflow else root / "images" / yolo_split[split]
        labels = root / SPLIT_OF[split] / "labels" if roboflow else root / "labels" / yolo_split[split]
        images.mkdir(parents=True, exist_ok=True)
        labels.mkdir(parents=True, exist_ok=True)
        shutil.copy(root.parent / "pixels" / f"{stem}.jpg", images / f"{stem}.jpg")
        lines = [f"{NAMES.index(label)} {(x + w / 2) / W:.6f} {(y + h / 2) / H:.6f} {w / W:.6f} {h / H:.6f}"
                 for label, (x, y, w, h) in objects]
        (labels / f"{stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
    if roboflow:
        (root / "data.yaml").write_text("train: ../train/images\nval: ../valid/images\ntest: ../test/images\n\n"
                                        f"nc: 3\nnames: {json.dumps(NAMES)}\n")
    else:
        (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\ntest: images/test\n"
                                        "names:\n  0: cat\n  1: dog\n  2: bird\n")


def voc_xml(stem: str, objects) -> str:
    body = "".join(f"<object><name>{label}</name><difficult>0</difficult><bndbox><xmin>{x + 1}</xmin>"
                   f"<ymin>{y + 1}</ymin><xmax>{x + w}</xmax><ymax>{y + h}</ymax></bndbox></object>"
                   for label, (x, y, w, h) in objects)
    return (f"<annotation><folder>JPEGImages</folder><filename>{stem}.jpg</filename><size><width>{W}</width>"
            f"<height>{H}</height><depth>3</depth></size>{body}</annotation>")


def write_voc(root: Path, items) -> None:
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    (root / "ImageSets" / "Main").mkdir(parents=True)
    for stem, _, objects in items:
        shutil.copy(root.parent / "pixels" / f"{stem}.jpg", root / "JPEGImages" / f"{stem}.jpg")
        (root / "Annotations" / f"{stem}.xml").write_text(voc_xml(stem, objects))
    for split, name in (("train", "train"), ("validation", "val"), ("test", "test")):
        (root / "ImageSets" / "Main" / f"{name}.txt").write_text("\n".join(s for s, sp, _ in items if sp == split))


def write_hf(root: Path, items) -> None:
    import datasets

    features = datasets.Features({
        "image": datasets.Image(),
        "image_id": datasets.Value("int64"),
        "objects": {"bbox": datasets.List(datasets.List(datasets.Value("float32"), length=4)),
                    "category": datasets.List(datasets.ClassLabel(names=NAMES))},
    })
    splits = {}
    for split in ("train", "validation", "test"):
        group = [it for it in items if it[1] == split]
        splits[split] = datasets.Dataset.from_dict({
            "image": [str(root.parent / "pixels" / f"{stem}.jpg") for stem, _, _ in group],
            "image_id": list(range(len(group))),
            "objects": [{"bbox": [list(b) for _, b in objects], "category": [NAMES.index(lb) for lb, _ in objects]}
                        for _, _, objects in group]}, features=features)
    datasets.DatasetDict(splits).save_to_disk(str(root))


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("exports")
    items = scenes()
    for i, (stem, _, _) in enumerate(items):
        _image(tmp / "pixels" / f"{stem}.jpg", i)
    roots = {name: tmp / name for name in ("coco", "roboflow", "yolo", "roboflow_yolo", "voc", "hf")}
    write_coco(roots["coco"], items, split_folders=False)
    write_coco(roots["roboflow"], items, split_folders=True)
    write_yolo(roots["yolo"], items, roboflow=False)
    write_yolo(roots["roboflow_yolo"], items, roboflow=True)
    write_voc(roots["voc"], items)
    write_hf(roots["hf"], items)
    return roots


def _prepare(data_dir: Path, out: Path, **options):
    from bbox_sft.data import PrepareArguments, prepare_dataset

    dataset = prepare_dataset(PrepareArguments(data_dir=str(data_dir), output_dir=str(out), **options))
    return dataset, json.loads((out / "build_report.json").read_text())


def _close(a, b, atol: float) -> bool:
    a, b = np.reshape(np.asarray(a, float), (-1, 4)), np.reshape(np.asarray(b, float), (-1, 4))
    return a.shape == b.shape and np.allclose(a, b, atol=atol)


def _records(dataset) -> dict[str, tuple]:
    return {r["image_id"]: (split, r["labels"], np.round(r["boxes"], 6).tolist(),
                            r["completion"][0]["content"][0]["text"], r["image"].tobytes())
            for split in dataset for r in dataset[split]}


def test_every_layout_gives_the_same_records_and_keeps_the_export_splits(exports, tmp_path) -> None:
    items = {stem: (split, objects) for stem, split, objects in scenes()}
    built = {}
    for name, root in exports.items():
        dataset, report = _prepare(root, tmp_path / name, task="objects", visualize=name == "roboflow")
        built[name] = _records(dataset)
        assert report["boxes"]["found"] == sum(len(o) for _, o in items.values()), name
        assert report["boxes"]["kept"] == report["boxes"]["found"] and report["boxes"]["lost"] == {}, name
        assert report["categories"] == sorted(NAMES), name
    for stem, (split, objects) in items.items():
        truth = expected((stem, split, objects))
        record = built["roboflow"][stem]
        assert record[0] == split, "the export's split is kept"
        assert record[1] == [o.label for o in truth]
        assert _close(record[2], [list(o.box) for o in truth], 1e-6)
        assert record[3] == format_objects(truth)
    reference = {stem: r[1:] for stem, r in built["roboflow"].items()}
    for name in ("yolo", "roboflow_yolo", "voc", "hf"):
        assert built[name].keys() == built["roboflow"].keys(), name
        for stem, record in built[name].items():
            assert record[0] == built["roboflow"][stem][0], (name, stem)  # the same splits
            assert record[1] == reference[stem][0] and record[3] == reference[stem][2], (name, stem)
            assert _close(record[2], reference[stem][1], 2e-6), (name, stem)
            assert record[4] == reference[stem][3], "the image's own bytes"
    coco = built["coco"]  # one unsplit file: the same records, split by hash
    assert {s: r[1:] for s, r in coco.items()} == {s: (r[0], r[1], r[2], r[3]) for s, r in reference.items()}
    assert (tmp_path / "roboflow" / "preview.png").is_file()


def test_roboflow_root_drops_its_placeholder_category_and_cuts_each_split_to_its_size(exports, tmp_path) -> None:
    dataset, report = _prepare(exports["roboflow"], tmp_path / "cut", task="phrase", val_size=1, test_size=1)
    assert report["dropped_categories"] == {"animals-project": "no boxes"}
    assert report["categories"] == sorted(NAMES) and report["export_splits"] == ["train", "validation", "test"]
    assert set(dataset["train"]["query"]) == set(NAMES), "the placeholder is never asked for"
    assert report["split_sizes"] == {"train": 6, "validation": 1, "test": 1}
    validation = [s for s, (sp, _) in {s: (sp, o) for s, sp, o in scenes()}.items() if sp == "validation"]
    by_split = report["boxes_by_split"]
    chosen = set(dataset["validation"]["image_id"]) | set(dataset["test"]["image_id"])
    left_out = sum(len(o) for s, sp, o in scenes() if sp in ("validation", "test") and s not in chosen)
    assert sum(by_split[s].get("lost", {}).get("beyond_split_size", 0) for s in by_split) == left_out
    assert len(validation) == 2 and len(set(dataset["validation"]["image_id"])) == 1
    card = (tmp_path / "cut" / "README.md").read_text()
    assert "animals-project" in card and "beyond_split_size" in card


def test_an_image_of_40_objects_is_kept_whole_and_its_answer_fits_grammar_and_budget(exports, tmp_path) -> None:
    from bbox_sft.tasks import get_task
    from bbox_sft.tiny import build_qwen_tokenizer

    dataset, report = _prepare(exports["yolo"], tmp_path / "many", task="objects")
    record = next(r for r in dataset["train"] if r["image_id"] == "crowd_40")
    assert len(record["labels"]) == 40 and report["most_objects"] == {"objects": 40, "image_id": "crowd_40"}
    task, tokenizer = get_task("objects"), build_qwen_tokenizer()
    assert task.max_objects(dataset["train"]) == 40
    for answer_format in ("json", "qwen"):
        grammar = task.grammar(tokenizer, answer_format, task.labels(dataset["train"]), None, 40)
        ids = grammar.compose(task.target(record))
        assert ids == tokenizer.encode(task.answer_text(task.target(record), answer_format))
        assert all(token in grammar.allowed(ids[:t]) for t, token in enumerate(ids))
        assert grammar.allowed(ids) == [grammar.eos], "the 40th object ends the list"
        widest = max(len(tokenizer.encode(task.answer_text([LabelledBox(label, box)] * 40, answer_format)))
                     for label in NAMES for box in (Box(0.12, 0.12, 0.98, 0.98), Box(0.12, 0.12, 1.0, 1.0)))
        assert task.token_budget(grammar) == widest + 1 >= len(ids) + 1  # 40 of the widest objects, and the end
        fewer = task.grammar(tokenizer, answer_format, task.labels(dataset["train"]), None, 39)
        assert any(token not in fewer.allowed(ids[:t]) for t, token in enumerate(ids)), "39 is a bound"


def test_max_objects_keeps_the_largest_boxes_and_counts_the_rest(exports, tmp_path) -> None:
    dataset, report = _prepare(exports["voc"], tmp_path / "capped", task="objects", max_objects=2)
    cut = 0
    for stem, split, objects in scenes():
        truth = expected((stem, split, objects))
        area = [(o.box.x_max - o.box.x_min) * (o.box.y_max - o.box.y_min) for o in truth]
        largest = sorted(sorted(range(len(truth)), key=lambda i: -area[i])[:2])  # ties: the first written
        record = next(r for s in dataset for r in dataset[s] if r["image_id"] == stem)
        assert record["completion"][0]["content"][0]["text"] == format_objects([truth[i] for i in largest]), stem
        cut += len(truth) - len(largest)
    assert cut > 38 and report["boxes"]["lost"] == {"over_max_objects": cut}
    assert report["boxes"]["kept"] + cut == report["boxes"]["found"]


def test_malformed_files_of_every_layout_are_counted_by_reason_never_fatal(exports, tmp_path) -> None:
    # COCO: an unknown category, a box outside the image, an image file missing
    coco = tmp_path / "coco"
    shutil.copytree(exports["coco"], coco)
    data = json.loads((coco / "annotations.json").read_text())
    data["annotations"] += [{"id": 900, "image_id": 0, "category_id": 77, "bbox": [1, 1, 5, 5]},
                            {"id": 901, "image_id": 0, "category_id": 1, "bbox": [W, 1, 5, 5]}]  # at the edge
    (coco / "annotations.json").write_text(json.dumps(data))
    missing = next(i for i in data["images"] if any(a["image_id"] == i["id"] for a in data["annotations"]) and i["id"])
    (coco / "images" / missing["file_name"]).unlink()
    _, report = _prepare(coco, tmp_path / "coco_out", task="objects")
    n_missing = sum(a["image_id"] == missing["id"] for a in data["annotations"])
    assert report["skipped"] == {"missing_file": 1}
    assert report["boxes"]["lost"] == {"unknown_category": 1, "outside_image": 1, "image_skipped": n_missing}

    # YOLO: a class index past the names, a box outside the image, a line that is no box, a label with no image
    yolo = tmp_path / "yolo"
    shutil.copytree(exports["yolo"], yolo)
    label = yolo / "labels" / "train" / "scene_00.txt"
    label.write_text(label.read_text() + "3 0.5 0.5 0.1 0.1\n0 1.5 1.5 0.2 0.2\n0 0.5 zero 0.1 0.1\n")  # 3 names
    (yolo / "labels" / "train" / "ghost.txt").write_text("0 0.5 0.5 0.1 0.1\n1 0.2 0.2 0.1 0.1\n")
    _, report = _prepare(yolo, tmp_path / "yolo_out", task="objects")
    assert report["boxes"]["lost"] == {"unknown_category": 1, "outside_image": 1, "bad_bbox": 1, "unknown_image": 2}
    assert report["boxes_by_split"]["train"]["lost"] == report["boxes"]["lost"]

    # VOC: an XML that does not parse, an XML whose image is missing
    voc = tmp_path / "voc"
    shutil.copytree(exports["voc"], voc)
    (voc / "Annotations" / "scene_01.xml").write_text("<annotation><object><name>cat</name")
    (voc / "JPEGImages" / "scene_02.jpg").unlink()
    dataset, report = _prepare(voc, tmp_path / "voc_out", task="objects")
    assert report["skipped"] == {"unreadable_annotation": 1, "missing_file": 1}
    broken = next(f for f in report["skipped_files"] if f["reason"] == "unreadable_annotation")
    assert broken["file"].endswith("scene_01.xml") and "does not parse" in broken["detail"]
    assert report["boxes"]["lost"] == {"image_skipped": len(next(o for s, _, o in scenes() if s == "scene_02"))}
    assert {"scene_01", "scene_02"}.isdisjoint(dataset["train"]["image_id"]) and len(dataset["train"]) == 4


def test_a_folder_of_no_layout_gets_the_layouts_of_the_task(tmp_path) -> None:
    from bbox_sft.data import PrepareArguments, prepare_dataset

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as raised:
        prepare_dataset(PrepareArguments(data_dir=str(tmp_path / "empty"), output_dir=str(tmp_path / "o"),
                                         task="phrase"))
    message = str(raised.value)
    assert "phrase task" in message and "YOLO" in message and "Pascal VOC" in message and "COCO" in message
    assert "train/ valid/ test/" in message and "DUTS" not in message, "phrase is not built from masks"


def test_preview_lines_and_labels_grow_with_the_photo() -> None:
    from bbox_sft.visualize import GREEN, TILE, draw_objects

    thickness = {}
    for side in (TILE, 2048, 4096):
        image = Image.new("RGB", (side, side // 2), (0, 0, 0))
        drawn = np.asarray(draw_objects(image, [LabelledBox("bird", Box(0.25, 0.25, 0.75, 0.75))], []))
        row = drawn[int(side * 0.35), :, :]  # through the box's left edge, below its label
        green = np.all(row == GREEN, axis=-1)
        thickness[side] = int(green[: side // 2].sum())
        thumb = Image.fromarray(drawn).copy()
        thumb.thumbnail((TILE, TILE))
        assert (np.asarray(thumb)[..., 1] > 120).sum(0).max() > 0
    assert thickness[TILE] == 3 and thickness[2048] == 24 and thickness[4096] == 48, thickness


# --- what each layout writes in the wild, and every box counted where it belongs --------------------------


def _split_and_boxes(dataset) -> dict[str, tuple[str, int]]:
    return {r["image_id"]: (split, len(r["labels"])) for split in dataset for r in dataset[split]}


def test_val_and_valid_folders_and_split_names_are_the_validation_split(exports, tmp_path) -> None:
    """Roboflow writes valid/, Ultralytics and many tools val/, datasets sets name splits validation, valid or val:
    each is the validation split, and test/ stays the test split (mapping val to test would drop the real one)."""
    import datasets

    expected_splits = {stem: split for stem, split, _ in scenes()}
    roots = {"valid/": exports["roboflow"], "val/": tmp_path / "val_folders"}
    shutil.copytree(exports["roboflow"], roots["val/"])
    (roots["val/"] / "valid").rename(roots["val/"] / "val")
    loaded = datasets.load_from_disk(str(exports["hf"]))
    for name in ("val", "valid"):
        roots[f"datasets '{name}'"] = tmp_path / f"hf_{name}"
        datasets.DatasetDict({"train": loaded["train"], name: loaded["validation"], "test": loaded["test"]}
                             ).save_to_disk(str(roots[f"datasets '{name}'"]))
    for what, root in roots.items():
        dataset, report = _prepare(root, tmp_path / f"out_{len(what)}_{what[:3]}", task="objects")
        assert {stem: split for stem, (split, _) in _split_and_boxes(dataset).items()} == expected_splits, what
        assert report["export_splits"] == ["train", "validation", "test"], what


def _unsplit(root: Path, layout: str) -> None:
    """The export without its split lists: YOLO as images/ + labels/ + classes.txt, VOC without ImageSets."""
    if layout == "yolo":
        for kind in ("images", "labels"):
            for path in list((root / kind).rglob("*.*")):
                path.rename(root / kind / path.name)
        (root / "data.yaml").unlink()
        (root / "classes.txt").write_text("\n".join(NAMES) + "\n")
    elif layout == "voc":
        shutil.rmtree(root / "ImageSets")


def _lose_three_boxes_each(root: Path, layout: str) -> None:
    """Three boxes right of the image added to scene_00, in the layout's own way."""
    if layout == "coco":
        data = json.loads((root / "annotations.json").read_text())
        image = next(i["id"] for i in data["images"] if i["file_name"] == "scene_00.jpg")
        data["annotations"] += [{"id": 900 + k, "image_id": image, "category_id": 1, "iscrowd": 0,
                                 "bbox": [W + 10 * k + 1, 10, 8, 5]} for k in range(3)]
        (root / "annotations.json").write_text(json.dumps(data))
    elif layout == "yolo":
        label = root / "labels" / "scene_00.txt"
        label.write_text(label.read_text() + "".join(f"1 1.{k + 2} 0.5 0.1 0.1\n" for k in range(3)))
    else:
        xml = root / "Annotations" / "scene_00.xml"
        extra = "".join(f"<object><name>dog</name><bndbox><xmin>{W + 10 * k + 2}</xmin><ymin>5</ymin><xmax>"
                        f"{W + 10 * k + 9}</xmax><ymax>30</ymax></bndbox></object>" for k in range(3))
        xml.write_text(xml.read_text().replace("</annotation>", extra + "</annotation>"))


@pytest.mark.parametrize("layout", ["coco", "yolo", "voc"])
def test_an_image_losing_several_boxes_to_one_reason_counts_each(exports, tmp_path, layout: str) -> None:
    """Three boxes of one image lost for one reason are three, in the totals and in the image's split; an unsplit
    export files every box under the split its image was drawn into, never under 'unsplit'."""
    root = tmp_path / layout
    shutil.copytree(exports[layout], root)
    _unsplit(root, layout)
    _lose_three_boxes_each(root, layout)
    dataset, report = _prepare(root, tmp_path / f"{layout}_out", task="objects")
    assert report["boxes"]["lost"] == {"outside_image": 3}, layout
    records = _split_and_boxes(dataset)
    split = records["scene_00"][0]
    assert report["boxes_by_split"][split]["lost"] == {"outside_image": 3}, layout
    for name in ("train", "validation", "test"):  # kept boxes filed where their images ended up
        kept = sum(n for s, n in records.values() if s == name)
        assert report["boxes_by_split"].get(name, {}).get("kept", 0) == kept, (layout, name)
    assert "unsplit" not in report["boxes_by_split"], layout


def test_yolo_class_indices_with_gaps_keep_their_names(exports, tmp_path) -> None:
    """data.yaml names as a mapping with a gap (0: cat, 2: bird): index 2 is bird, however many names there are."""
    root = tmp_path / "gaps"
    shutil.copytree(exports["yolo"], root)
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\ntest: images/test\n"
                                    "names:\n  0: cat\n  2: bird\n")
    for label in (root / "labels").rglob("*.txt"):  # dogs (index 1) go: no name for them now
        label.write_text("".join(line + "\n" for line in label.read_text().splitlines() if not line.startswith("1 ")))
    dataset, report = _prepare(root, tmp_path / "gaps_out", task="objects")
    birds = sum(label == "bird" for _, _, objects in scenes() for label, _ in objects)
    assert sum(r["labels"].count("bird") for s in dataset for r in dataset[s]) == birds > 0
    assert report["categories"] == ["bird", "cat"] and report["boxes"]["lost"] == {}


def test_a_voc_object_with_a_blank_name_is_lost_as_unnamed_not_labelled_blank(exports, tmp_path) -> None:
    root = tmp_path / "voc"
    shutil.copytree(exports["voc"], root)
    xml = root / "Annotations" / "scene_00.xml"
    blank = ("<object><name>  \t</name><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>50</xmax><ymax>40</ymax></bndbox>"
             "</object>")
    xml.write_text(xml.read_text().replace("</annotation>", blank + "</annotation>"))
    dataset, report = _prepare(root, tmp_path / "voc_out", task="objects")
    assert report["boxes"]["lost"] == {"no_label": 1}
    assert all(label.strip() for s in dataset for r in dataset[s] for label in r["labels"])
    assert report["categories"] == sorted(NAMES)


def test_each_image_asks_for_its_own_absent_category(exports, tmp_path) -> None:
    """The phrase task asks each image about one category it does not hold, drawn per image by a stable hash
    (sha256 of seed, image id and category, computed here): images differ in which absent category they get."""
    import hashlib

    dataset, _ = _prepare(exports["yolo"], tmp_path / "phrase", task="phrase", seed=7)
    asked_absent = {}
    for split in dataset:
        for r in dataset[split]:
            if not r["labels"]:
                asked_absent.setdefault(r["image_id"], []).append(r["query"])
    drawn = {}
    for stem, _, objects in scenes():
        missing = [c for c in NAMES if c not in {label for label, _ in objects}]
        if missing:
            drawn[stem] = [min(missing, key=lambda c: hashlib.sha256(f"7:{stem}:{c}".encode()).digest())]
    assert asked_absent == drawn
    assert len({q for queries in drawn.values() for q in queries}) > 1
