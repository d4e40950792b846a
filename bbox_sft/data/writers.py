"""Labelled images written as the tools import them: COCO, YOLO (Ultralytics), Pascal VOC, a ``datasets`` set.

Each writer is the mirror of its reader (:mod:`bbox_sft.data.coco`, :mod:`~bbox_sft.data.yolo`,
:mod:`~bbox_sft.data.voc`, :mod:`~bbox_sft.data.detection_dataset`): what ``bbox-sft label`` writes,
``bbox-sft prepare`` reads back. Annotations are serialized by supervision, one image at a time
(``detections_to_coco_annotations``, ``detections_to_yolo_annotations``, ``detections_to_pascal_voc``:
its dataset exporters hold every image in memory and re-encode them); images are copied byte for byte or
linked, never re-encoded. Writers stream: :meth:`ExportWriter.add` takes one image at a time, and the
files that gather every image (a COCO instances file, a ``datasets`` set) are assembled at the end from
parts on disk, so memory does not grow with the number of images.

What each layout rounds: COCO and a ``datasets`` set keep pixel boxes as floats (float32 in the
``datasets`` set); YOLO writes centre and size over the image with 5 decimals; VOC writes whole pixels
(1-based, inclusive): a box moves by up to half a pixel on each edge. Scores go where the layout has a place
for them (COCO's ``score``, ``objects.score`` in the ``datasets`` set) and into ``scores.jsonl`` beside YOLO
and VOC exports (one line per image: its file name and its boxes' scores, in the order the boxes are written).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..boxes import Box


@dataclass(frozen=True)
class LabelledImage:
    """One labelled image: its file, its name in the export, its upright size, and its boxes (normalised) with
    their labels and scores (None: not scored)."""

    path: str
    name: str
    width: int
    height: int
    objects: tuple[tuple[str, Box, float | None], ...]

    def detections(self, classes: Sequence[str]):
        """The boxes as supervision's ``Detections`` in pixels, class ids by ``classes``."""
        import supervision as sv

        if not self.objects:
            return sv.Detections.empty()
        xyxy = np.array([[b.x_min * self.width, b.y_min * self.height, b.x_max * self.width, b.y_max * self.height]
                         for _, b, _ in self.objects], dtype=np.float64)
        return sv.Detections(xyxy=xyxy, class_id=np.array([classes.index(label) for label, _, _ in self.objects]))

    @property
    def scores(self) -> list[float | None]:
        return [score for _, _, score in self.objects]


def place_image(source: str | Path, target: Path, link: bool) -> None:
    """``source`` at ``target``, its bytes as they are: copied, or a symbolic link to it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()
    if link:
        os.symlink(Path(source).resolve(), target)
    else:
        shutil.copyfile(source, target)


class ExportWriter(ABC):
    """One export layout: :meth:`begin` with the class names, :meth:`add` each image in order, :meth:`end`."""

    name: ClassVar[str]
    description: ClassVar[str]
    writes: ClassVar[tuple[str, ...]]  # what it writes in the export's folder (an earlier export's, removed first)

    def __init__(self, out: Path, classes: Sequence[str], link_images: bool = False) -> None:
        self.out, self.classes, self.link = Path(out), list(classes), link_images

    def begin(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        for name in self.writes:
            path = self.out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()

    @abstractmethod
    def add(self, image: LabelledImage) -> None:
        """Write one image and its boxes."""

    def end(self) -> None:  # noqa: B027 (most layouts have nothing to gather)
        """Write what gathers every image."""

    def _sidecar(self, image: LabelledImage) -> None:
        with open(self.out / "scores.jsonl", "a") as f:
            f.write(json.dumps({"image": image.name, "scores": image.scores}) + "\n")


class CocoWriter(ExportWriter):
    """``annotations.json`` (images, annotations with their ``score``, categories 1-based) and ``images/``."""

    name = "coco"
    description = "COCO instances: annotations.json + images/ (CVAT, Label Studio, Roboflow import it)"
    writes = ("annotations.json", "images")

    def begin(self) -> None:
        super().begin()
        self.parts = {key: open(self.out / f".{key}.jsonl", "w") for key in ("images", "annotations")}
        self.images, self.next_annotation = 0, 1

    def add(self, image: LabelledImage) -> None:
        from supervision.dataset.formats.coco import detections_to_coco_annotations

        place_image(image.path, self.out / "images" / image.name, self.link)
        self.images += 1
        image_id = self.images
        self.parts["images"].write(json.dumps({"id": image_id, "file_name": image.name, "width": image.width,
                                               "height": image.height}) + "\n")
        annotations, self.next_annotation = detections_to_coco_annotations(
            image.detections(self.classes), image_id=image_id, annotation_id=self.next_annotation)
        for annotation, score in zip(annotations, image.scores):
            annotation.pop("segmentation", None)
            self.parts["annotations"].write(json.dumps({**annotation, "score": score}) + "\n")

    def end(self) -> None:
        from supervision.dataset.formats.coco import classes_to_coco_categories

        for part in self.parts.values():
            part.close()
        with open(self.out / "annotations.json", "w") as f:  # assembled line by line: nothing held whole
            f.write('{"info": {"description": "labelled by bbox-sft"}, "licenses": [], "categories": ')
            f.write(json.dumps(classes_to_coco_categories(self.classes)))
            for key in ("images", "annotations"):
                f.write(f', "{key}": [')
                with open(self.out / f".{key}.jsonl") as part:
                    for k, line in enumerate(part):
                        f.write(("," if k else "") + line.rstrip("\n"))
                f.write("]")
            f.write("}\n")
        for key in self.parts:
            (self.out / f".{key}.jsonl").unlink()


class YoloWriter(ExportWriter):
    """Ultralytics' layout: ``images/``, ``labels/`` (``class cx cy w h`` over the image), ``data.yaml`` (the class
    names; the one image folder as train and as val, which Ultralytics asks for), ``scores.jsonl``."""

    name = "yolo"
    description = "YOLO (Ultralytics): data.yaml + images/ + labels/"
    writes = ("data.yaml", "images", "labels", "scores.jsonl")

    def add(self, image: LabelledImage) -> None:
        from supervision.dataset.formats.yolo import detections_to_yolo_annotations

        place_image(image.path, self.out / "images" / image.name, self.link)
        lines = detections_to_yolo_annotations(image.detections(self.classes), (image.height, image.width))
        label = self.out / "labels" / f"{Path(image.name).stem}.txt"
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text("".join(line + "\n" for line in lines))
        self._sidecar(image)

    def end(self) -> None:
        names = "".join(f"  {k}: {json.dumps(name)}\n" for k, name in enumerate(self.classes))
        (self.out / "data.yaml").write_text(f"path: .\ntrain: images\nval: images\nnames:\n{names}")


class VocWriter(ExportWriter):
    """Pascal VOC: ``Annotations/<stem>.xml`` (whole pixels, 1-based inclusive) + ``JPEGImages/``, ``scores.jsonl``."""

    name = "voc"
    description = "Pascal VOC: Annotations/*.xml + JPEGImages/"
    writes = ("Annotations", "JPEGImages", "scores.jsonl")

    def add(self, image: LabelledImage) -> None:
        from supervision.dataset.formats.pascal_voc import detections_to_pascal_voc

        place_image(image.path, self.out / "JPEGImages" / image.name, self.link)
        xml = detections_to_pascal_voc(image.detections(self.classes), self.classes, image.name,
                                       (image.height, image.width, 3))
        target = self.out / "Annotations" / f"{Path(image.name).stem}.xml"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(xml)
        self._sidecar(image)


class DatasetWriter(ExportWriter):
    """A ``datasets`` detection set as transformers' object-detection guide has it (``image``, ``image_id``,
    ``width``, ``height``, ``objects`` of ``id``, ``area``, ``bbox`` COCO pixels, ``category`` a ``ClassLabel``),
    with ``objects.score``; written with ``save_to_disk`` (the images' own bytes inside)."""

    name = "hf"
    description = "a datasets detection set in dataset/ (save_to_disk; load_from_disk or push_to_hub)"
    writes = ("dataset",)
    # save_to_disk's Arrow files: it copies its input in batches of up to 100 MB, within a file, each batch costing
    # about three times its size in memory while it is embedded and written. At datasets' default (500 MB files)
    # the peak grows with the export up to that; at 32 MB it stays flat (bench/label_memory.py)
    max_shard_size: ClassVar[str] = "32MB"

    def begin(self) -> None:
        super().begin()
        self.part = open(self.out / ".rows.jsonl", "w")

    def add(self, image: LabelledImage) -> None:
        objects = [(label, (b.x_min * image.width, b.y_min * image.height, (b.x_max - b.x_min) * image.width,
                            (b.y_max - b.y_min) * image.height), score) for label, b, score in image.objects]
        self.part.write(json.dumps({"path": str(image.path), "name": image.name, "width": image.width,
                                    "height": image.height, "objects": objects}) + "\n")

    def end(self) -> None:
        import datasets

        self.part.close()
        features = datasets.Features({
            "image": datasets.Image(), "image_id": datasets.Value("int64"), "width": datasets.Value("int32"),
            "height": datasets.Value("int32"),
            "objects": {"id": datasets.List(datasets.Value("int64")), "area": datasets.List(datasets.Value("float32")),
                        "bbox": datasets.List(datasets.List(datasets.Value("float32"), length=4)),
                        "category": datasets.List(datasets.ClassLabel(names=self.classes)),
                        "score": datasets.List(datasets.Value("float32"))}})
        part = self.out / ".rows.jsonl"
        cache = self.out / ".cache"
        fingerprint = hashlib.sha256(part.read_bytes() + json.dumps(self.classes).encode()).hexdigest()[:16]
        dataset = datasets.Dataset.from_generator(dataset_rows, features=features, cache_dir=str(cache),
                                                  # a list in gen_kwargs would be split into shards: the names as text
                                                  gen_kwargs={"part": str(part), "classes": json.dumps(self.classes)},
                                                  fingerprint=fingerprint, writer_batch_size=64)
        datasets.DatasetDict({"train": dataset}).save_to_disk(str(self.out / "dataset"),
                                                               max_shard_size=self.max_shard_size)
        del dataset
        shutil.rmtree(cache, ignore_errors=True)
        part.unlink()


def dataset_rows(part: str, classes: str) -> Iterator[dict[str, Any]]:
    """The ``datasets`` set's rows from the writer's part file, one image at a time (its bytes as they are);
    ``classes``: the class names, as JSON."""
    names = json.loads(classes)
    with open(part) as f:
        for k, line in enumerate(f):
            row = json.loads(line)
            objects = row["objects"]
            yield {"image": {"bytes": Path(row["path"]).read_bytes(), "path": row["name"]}, "image_id": k,
                   "width": row["width"], "height": row["height"],
                   "objects": {"id": list(range(len(objects))), "area": [w * h for _, (_, _, w, h), _ in objects],
                               "bbox": [list(box) for _, box, _ in objects],
                               "category": [names.index(label) for label, _, _ in objects],
                               "score": [score for _, _, score in objects]}}


WRITERS: dict[str, type[ExportWriter]] = {w.name: w for w in (CocoWriter, YoloWriter, VocWriter, DatasetWriter)}


def get_writer(name: str) -> type[ExportWriter]:
    if name not in WRITERS:
        raise ValueError(f"--format must be one of {', '.join(WRITERS)}, got {name!r}")
    return WRITERS[name]
