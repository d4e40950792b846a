"""``bbox-sft label``: a folder of unlabelled photos in, a dataset in a layout annotation and detector tools import.

    bbox-sft label --adapter outputs/objects-lora --dir photos/ --output labelled/ --format yolo

The adapter answers each image (locally, or through one or several vLLM servers: ``--server URL [URL ...]``,
each image to one of them); every answer is appended to ``labels.jsonl`` as it comes, the one record a run
keeps while it works. At the end the export is written from it (:mod:`bbox_sft.data.writers`: COCO, YOLO, VOC,
a ``datasets`` set), with:

- ``--min_confidence``: boxes scored below it are left out of the export, and counted;
- ``--review_below``: images whose lowest box score is below it are listed in ``review.jsonl`` and drawn on
  ``review.png``, lowest first: what a person should look at before training on the labels;
- ``label_report.json``: images, boxes per label, boxes dropped, images to review, unreadable files by reason.

A folder of any size streams: images are read a window at a time and nothing gathers them in memory. A run
that stops (killed, the machine restarted) continues with ``--resume``: images already in ``labels.jsonl`` are
not asked again (a line cut short by the stop is dropped and its image asked again), and the export written
at the end is the same, byte for byte, as an uninterrupted run's.

What the boxes are labelled: objects models, their own labels; phrase models, the category asked (``--query``,
each asked of every image); subject models, ``--label`` (default ``object``); refer models, ``--label``, or by
default the description asked (``--queries``, a JSON-lines file of ``{"image", "query"}``).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .boxes import Box
from .data.writers import LabelledImage, get_writer
from .predict import BoxPredictor, ImageResult, Predictor, image_files, read_queries, resolve_adapter
from .tasks import Task

logger = logging.getLogger(__name__)
LEDGER = "labels.jsonl"
SETTINGS = "label_args.json"
REPORT = "label_report.json"
# what must not change between a run and its --resume (the answers in the ledger depend on them)
ANSWER_SETTINGS = ("adapter", "dir", "queries", "query", "label", "base")


@dataclass
class LabelArguments:
    """Arguments of ``bbox-sft label``."""

    adapter: str = field(metadata={"help": "Adapter (or full model) folder written by training, or a Hub id."})
    output: str = field(metadata={"help": "The export's folder (the layout's files, labels.jsonl, the report)."})
    dir: str | None = field(default=None, metadata={"help": "The folder of images to label."})
    format: str = field(default="coco", metadata={
        "help": "coco (annotations.json + images/) | yolo (data.yaml + images/ + labels/) | voc (Annotations/ + "
                "JPEGImages/) | hf (a datasets detection set, save_to_disk)."})
    images: str = field(default="copy", metadata={"help": "copy | link: how the images enter the export (never "
                                                            "re-encoded)."})
    query: list[str] | None = field(default=None, metadata={
        "action": "extend", "help": "phrase models: the categories to find, each asked of every image."})
    queries: str | None = field(default=None, metadata={
        "help": "refer models: a JSON-lines file of {\"image\", \"query\"} (an image may have several), instead of "
                "--dir; paths relative to the file."})
    label: str | None = field(default=None, metadata={
        "help": "subject and refer models: the label of their box (default: object; refer: the description)."})
    min_confidence: float | None = field(default=None, metadata={
        "help": "Leave out boxes scored below this (the calibrated confidence of a box, an object's score); counted."})
    review_below: float | None = field(default=None, metadata={
        "help": "List the images whose lowest box score is below this in review.jsonl and draw them on review.png."})
    review_sheet: int = field(default=48, metadata={"help": "Images drawn on review.png (the lowest first)."})
    resume: bool = field(default=False, metadata={"help": "Continue a run that stopped, in the same --output."})
    server: list[str] | None = field(default=None, metadata={
        "help": "Ask vLLM servers started by `bbox-sft serve` instead of loading the model here; several share the "
                "folder (each image to one)."})
    model_name: str | None = field(default=None, metadata={"help": "--server: the name the adapter is served "
                                                                      "under."})
    max_in_flight: int = field(default=8, metadata={"help": "--server: requests sent at once, to each server."})
    api_key: str | None = field(default=None, metadata={"help": "--server: its key (default: OPENAI_API_KEY)."})
    base: str | None = field(default=None, metadata={"help": "Base model (default: the adapter's own)."})
    batch_size: int = field(default=8, metadata={"help": "Images per generation batch (local)."})


def make_predictor(args: LabelArguments) -> Predictor:
    if args.server:
        from .server_client import ServerPredictor

        return ServerPredictor.from_pretrained(args.adapter, args.server, model=args.model_name,
                                               max_in_flight=args.max_in_flight, api_key=args.api_key)
    return BoxPredictor.from_pretrained(args.adapter, base=args.base, batch_size=args.batch_size)


@dataclass
class Plan:
    """What is asked of which image, and the labels its boxes get."""

    jobs: list[tuple[Path, list[str | None]]]  # each image and its questions, in the order they are labelled
    classes: list[str]


def plan(args: LabelArguments, task: Task, labels: Sequence[str] | None) -> Plan:
    """Each image's questions and the export's classes, as the task asks them; what the task cannot take, refused."""
    if task.takes_query and task.answers_list:  # phrase: every category asked of every image
        if not args.query or args.dir is None:
            raise ValueError(f"a {task.name} model labels a --dir by the categories in --query (one or more)")
        return Plan([(path, list(args.query)) for path in image_files(args.dir)], list(dict.fromkeys(args.query)))
    if args.query:
        raise ValueError(f"a {task.name} model takes no --query")
    if task.takes_query:  # refer: the queries file, its lines grouped by image (first seen first)
        if args.queries is None:
            raise ValueError(f"a {task.name} model labels the images of --queries (JSON lines of image and query)")
        paths, asked = read_queries(args.queries)
        jobs: dict[Path, list[str | None]] = {}
        for path, text in zip(paths, asked):
            jobs.setdefault(path, []).append(text)
        classes = [args.label] if args.label else list(dict.fromkeys(asked))
        return Plan(list(jobs.items()), classes)
    if args.dir is None or args.queries is not None:
        raise ValueError(f"a {task.name} model labels a --dir")
    if task.answers_list:
        if not labels:
            raise ValueError("this objects model has no saved labels (bbox_sft_args.json): nothing to name boxes by")
        return Plan([(path, [None]) for path in image_files(args.dir)], list(labels))
    return Plan([(path, [None]) for path in image_files(args.dir)], [args.label or "object"])


def answered(task: Task, result: ImageResult, label: str | None) -> list[tuple[str, Box, float | None]]:
    """An answer's boxes with their labels and scores (a box task's score: its calibrated confidence)."""
    prediction = result.prediction
    answer = task.answer(prediction)
    if answer is None:
        return []
    if isinstance(answer, list):
        scores = task.scores(prediction) or [None] * len(answer)
        return [(label or o.label, o.box, score) for o, score in zip(answer, scores)]
    return [(label or result.query or "object", answer, prediction.confidence)]


def entries(predictor: Predictor, jobs: Sequence[tuple[Path, list[str | None]]], label: str | None
            ) -> Iterator[dict[str, Any]]:
    """One ledger entry per image, in order: its boxes from every question asked of it, or its error."""
    task = predictor.task
    pairs = [(path, q) for path, asked in jobs for q in asked]
    results = predictor.predict_files([p for p, _ in pairs], query=[q for _, q in pairs])
    for path, group in groupby(zip(pairs, results), key=lambda pair: pair[0][0]):
        group = [result for _, result in group]
        failed = next((r for r in group if r.error), None)
        entry: dict[str, Any] = {"image": str(path), "name": Path(path).name}
        if failed is not None:
            entry.update(error=failed.error, reason=failed.reason)
        else:
            entry.update(width=group[0].width, height=group[0].height, objects=[
                [name, list(box), score] for r in group for name, box, score in answered(task, r, label)])
        yield entry


def read_ledger(path: Path) -> list[str]:
    """The images a ledger holds; a last line cut short by a stop is dropped from the file (its image is asked
    again)."""
    if not path.is_file():
        return []
    text = path.read_text()
    kept = text[: text.rfind("\n") + 1]
    if kept != text:
        path.write_text(kept)
    return [json.loads(line)["image"] for line in kept.splitlines()]


def label_folder(args: LabelArguments, predictor: Predictor | None = None) -> dict[str, Any]:
    """Label the images, then write the export, the review set and the report from ``labels.jsonl``."""
    if args.images not in ("copy", "link"):
        raise ValueError(f"--images must be copy or link, got {args.images!r}")
    writer_class = get_writer(args.format)
    out = Path(args.output)
    settings = {k: v for k, v in asdict(args).items() if k in ANSWER_SETTINGS}
    if args.resume and (out / SETTINGS).is_file():
        before = json.loads((out / SETTINGS).read_text())
        changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
        if changed:
            raise ValueError(f"--resume of {out} with other settings than its run: {changed}")
    elif (out / LEDGER).is_file():
        raise ValueError(f"{out} holds a labelling run: --resume to continue it, or another --output")
    resolve_adapter(args.adapter)
    predictor = predictor or make_predictor(args)
    task = predictor.task
    scored = task.answers_list or getattr(predictor, "calibration", None) is not None
    if not scored and (args.min_confidence is not None or args.review_below is not None):
        raise ValueError(f"this {task.name} adapter has no calibrated confidence (box_confidence.json): nothing to "
                         "filter or review by")
    work = plan(args, task, getattr(predictor, "labels", None))
    out.mkdir(parents=True, exist_ok=True)
    (out / SETTINGS).write_text(json.dumps(settings, indent=2))
    done = set(read_ledger(out / LEDGER))
    todo = [(path, asked) for path, asked in work.jobs if str(path) not in done]
    if done:
        logger.info("resuming: %d image(s) labelled before, %d to go", len(done), len(todo))
    with open(out / LEDGER, "a") as ledger:
        for entry in tqdm(entries(predictor, todo, args.label if not task.answers_list else None), total=len(todo),
                          desc="Labelling", unit="image"):
            ledger.write(json.dumps(entry) + "\n")
            ledger.flush()
    report = write_export(out, writer_class(out, work.classes, link_images=args.images == "link"), task, args)
    report.update(format=args.format, adapter=args.adapter, task=task.name, classes=work.classes)
    (out / REPORT).write_text(json.dumps(report, indent=2))
    logger.info("%d image(s) labelled with %d box(es) %s; %d dropped below %s; %d to review; %d unreadable%s",
                report["labelled"], report["boxes"], report["boxes_per_label"], report["dropped_below_min_confidence"],
                args.min_confidence, report["review"], sum(report["unreadable"].values()),
                f" ({report['unreadable']})" if report["unreadable"] else "")
    return report


def write_export(out: Path, writer, task: Task, args: LabelArguments) -> dict[str, Any]:
    """The export, ``review.jsonl`` / ``review.png`` and the counts, from the ledger, one image at a time."""
    per_label: Counter = Counter()
    unreadable: Counter = Counter()
    failed, dropped, labelled, review = [], 0, 0, []
    (out / "review.png").unlink(missing_ok=True)
    writer.begin()
    with open(out / LEDGER) as ledger, open(out / "review.jsonl", "w") as reviewed:
        for line in ledger:
            entry = json.loads(line)
            if entry.get("error"):
                unreadable[entry["reason"] or "unreadable"] += 1
                failed.append({"image": entry["image"], "reason": entry["reason"], "error": entry["error"]})
                continue
            labelled += 1
            objects = [(name, Box(*box), score) for name, box, score in entry["objects"]]
            kept = [o for o in objects if args.min_confidence is None or o[2] is None or o[2] >= args.min_confidence]
            dropped += len(objects) - len(kept)
            per_label.update(name for name, _, _ in kept)
            scores = [score for _, _, score in objects if score is not None]
            if args.review_below is not None and scores and min(scores) < args.review_below:
                review.append((min(scores), entry["image"]))
                reviewed.write(json.dumps({"image": entry["image"], "lowest_score": min(scores),
                                           "objects": entry["objects"]}) + "\n")
            writer.add(LabelledImage(entry["image"], entry["name"], entry["width"], entry["height"], tuple(kept)))
    writer.end()
    if review:
        review_sheet(out, task, review, args.review_sheet)
    return {"images": labelled + len(failed), "labelled": labelled, "boxes": sum(per_label.values()),
            "boxes_per_label": dict(sorted(per_label.items())), "dropped_below_min_confidence": dropped,
            "min_confidence": args.min_confidence, "review": len(review), "review_below": args.review_below,
            "unreadable": dict(unreadable), "unreadable_files": failed}


def review_sheet(out: Path, task: Task, review: list[tuple[float, str]], n: int) -> Path:
    """``review.png``: the ``n`` images with the lowest box scores, lowest first, each with its boxes and scores."""
    from .formats import LabelledBox
    from .images import load_image
    from .visualize import draw_objects, image_grid

    shown = sorted(review)[:n]
    wanted = {image for _, image in shown}
    objects = {}
    with open(out / "review.jsonl") as lines:
        for line in lines:
            entry = json.loads(line)
            if entry["image"] in wanted:
                objects[entry["image"]] = [LabelledBox(f"{name} {s:.2f}" if s is not None else name, Box(*box))
                                           for name, box, s in entry["objects"]]
    tiles = [draw_objects(load_image(image), [], objects[image], caption=f"{score:.2f} {Path(image).name}")
             for score, image in shown]
    path = out / "review.png"
    image_grid(tiles).save(path)
    return path
