"""``bbox-sft eval``: the adapter, the base model without it, and the center prior, side by side.

Every report puts the three rows on the same split, so a user sees at once whether fine-tuning
helped. The base row runs the same model with the adapter switched off (peft's
``disable_adapter``), so the base weights are loaded once. Records whose image cannot be decoded
are skipped, counted and named in the report. The split is streamed a few batches at a time.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from tqdm.auto import tqdm

from .boxes import Box, iou
from .calibration import Calibration, confidence_metrics, save_reliability_plot
from .data.coco_builder import dataset_labels, is_list_task, record_objects
from .data.prepare import load_or_build_dataset
from .decoding import Prediction, generate_answers
from .detection import DETECTION_METRIC_NAMES, detection_metrics
from .images import ImageError, open_image
from .metrics import METRIC_NAMES, box_metrics
from .objects import LabelledBox
from .predict import (
    BoxPredictor,
    adapter_base,
    load_for_inference,
    resolve_adapter,
    rounded,
    trained_answer_format,
    trained_labels,
)
from .task import NATIVE_GROUNDING_INSTRUCTION, parse_native_grounding
from .visualize import save_box_grid, save_objects_grid

logger = logging.getLogger(__name__)


@dataclass
class EvalArguments:
    """Arguments of ``bbox-sft eval``."""

    adapter: str = field(metadata={"help": "Adapter (or full model) folder written by training."})
    dataset: str = field(metadata={"help": "Prepared dataset folder or Hub dataset id."})
    output_dir: str = field(metadata={"help": "Where the reports, predictions and grid go."})
    split: str = field(default="test", metadata={"help": "Split to evaluate."})
    base: str | None = field(default=None, metadata={"help": "Base model (default: the adapter's own)."})
    max_samples: int | None = field(default=None, metadata={"help": "Evaluate the first N records only."})
    batch_size: int = field(default=8, metadata={"help": "Images per generation batch."})
    constrained: bool = field(default=True, metadata={"help": "Constrained decoding (parse rate 1.0)."})
    grid_images: int = field(default=16, metadata={"help": "Predictions drawn in grid.png."})
    native_baseline: bool | None = field(
        default=None,
        metadata={"help": "Add the row 'base, native grounding prompt': the base model asked in Qwen-VL's own "
                          "grounding words, unconstrained (default: on when the base is a Qwen-VL)."},
    )
    native_pick: str = field(default="first", metadata={"help": "Native answers with several boxes: "
                                                                 "'first' or 'largest'."})
    native_max_new_tokens: int = field(default=128, metadata={"help": "Token budget of a native answer."})


def decode_records(split: datasets.Dataset, processor=None) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Records with decoded images (shrunk to ``processor``'s size); the ones that do not decode, as skipped."""
    raw = split.cast_column("image", datasets.Image(decode=False))
    kept, skipped = [], []
    for record in raw:
        try:
            image, _ = open_image(record["image"]["bytes"] or record["image"]["path"], processor)
            kept.append({**record, "image": image})
        except ImageError as error:
            logger.error("%s: cannot decode image (%s); skipped", record["image_id"], error)
            skipped.append({"image_id": record["image_id"], "error": str(error)})
    return kept, skipped


def center_prior(dataset: datasets.DatasetDict, split: str) -> tuple[Box, str]:
    """The mean training box, or the evaluated split's own mean when there is no train split; and which."""
    if "train" in dataset and len(dataset["train"]):
        source, said = dataset["train"], "mean box of the train split"
    else:
        source = dataset[split]
        said = f"mean box of the evaluated split {split!r} itself: the dataset has no train split"
    return Box(*np.asarray(source["box"], dtype=float).mean(0).tolist()), said


def evaluate_adapter(args: EvalArguments) -> dict[str, dict[str, float]]:
    """Score the three rows on ``args.split``; write metrics.json, report.md, predictions.jsonl, grid.png.

    Streams: a window of a few batches is decoded (shrunk to the processor's size), predicted with
    and without the adapter, written to predictions.jsonl and dropped, so memory does not grow with
    the split.
    """
    dataset = load_or_build_dataset(args.dataset)
    if args.split not in dataset:
        raise ValueError(f"{args.dataset} has no split {args.split!r} (it has {list(dataset)})")
    split = dataset[args.split]
    if args.max_samples:
        split = split.select(range(min(args.max_samples, len(split))))
    if len(split) == 0:
        raise ValueError(f"{args.dataset}: split {args.split!r} is empty, nothing to evaluate")
    if is_list_task(split):
        return evaluate_lists(args, dataset, split)
    prior, prior_source = center_prior(dataset, args.split)
    adapter_dir = resolve_adapter(args.adapter)
    model, processor = load_for_inference(adapter_dir, args.base)
    calibration = Calibration.load(adapter_dir)
    predictor = BoxPredictor(model, processor, answer_format=trained_answer_format(adapter_dir),
                             constrained=args.constrained, batch_size=args.batch_size, calibration=calibration)
    has_base = adapter_base(adapter_dir) is not None and predictor.has_adapter
    native = args.native_baseline if args.native_baseline is not None else has_base and is_qwen_vl(model)
    if args.native_pick not in ("first", "largest"):
        raise ValueError(f"native_pick must be 'first' or 'largest', got {args.native_pick!r}")
    parse_native = functools.partial(parse_native_grounding, pick=args.native_pick)

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    truths, adapted, base, native_boxes, grid, skipped = [], [], [], [], [], []
    confidences: list[float | None] = []
    window = 4 * args.batch_size
    with open(out / "predictions.jsonl", "w") as f, tqdm(total=len(split), desc="Evaluating", unit="image") as bar:
        for start in range(0, len(split), window):
            records, bad = decode_records(split.select(range(start, min(start + window, len(split)))), processor)
            skipped += bad
            images = [r["image"] for r in records]
            mine = predictor.predict(images)
            theirs: list[Prediction | None] = [None] * len(images)
            asked: list[Prediction | None] = [None] * len(images)
            with predictor.without_adapter() if has_base else contextlib.nullcontext():
                if has_base:
                    theirs = predictor.predict(images)
                if native:
                    asked = generate_answers(model, processor, images, constrained=False, batch_size=args.batch_size,
                                             max_new_tokens=args.native_max_new_tokens, progress=False,
                                             instruction=NATIVE_GROUNDING_INSTRUCTION, parse=parse_native)
            for record, p, b, q in zip(records, mine, theirs, asked):
                line = {"image_id": record["image_id"], "truth": record["box"], "box": p.box, "raw": p.raw,
                        "confidence": rounded(p.confidence), "spread": rounded(p.spread)}
                if b is not None:
                    line["base_box"], line["base_raw"] = b.box, b.raw
                if q is not None:
                    line["native_box"], line["native_raw"] = q.box, q.raw
                f.write(json.dumps(line) + "\n")
                if len(grid) < args.grid_images:
                    label = f"{p.confidence:.2f}" if p.confidence is not None else None
                    grid.append((record["image"], record["box"], p.box, label))
            f.flush()
            truths += [r["box"] for r in records]
            adapted += [p.box for p in mine]
            confidences += [p.confidence for p in mine]
            base += [b.box for b in theirs if b is not None]
            native_boxes += [q.box for q in asked if q is not None]
            bar.update(len(records) + len(bad))

    rows: dict[str, dict[str, float]] = {"adapter": box_metrics(adapted, truths)}
    if has_base:
        rows["base (no adapter)"] = box_metrics(base, truths)
    if native:
        rows["base, native grounding prompt"] = box_metrics(native_boxes, truths)
    rows["center prior"] = box_metrics([prior] * len(truths), truths)
    report = {"adapter": args.adapter, "dataset": args.dataset, "split": args.split, "evaluated": len(truths),
              "skipped": skipped, "rows": rows, "center_prior_box": list(prior),
              "center_prior_source": prior_source, "arguments": asdict(args)}
    if native:
        report["native_prompt"] = {"instruction": NATIVE_GROUNDING_INSTRUCTION, "pick": args.native_pick}
    if calibration is not None:
        ious = [iou(b, t) for b, t in zip(adapted, truths)]
        report["confidence"] = {**confidence_metrics(confidences, ious), "calibrated_on": calibration.fitted_on}
        scored = [(c, i) for c, i in zip(confidences, ious) if c is not None]
        save_reliability_plot([c for c, _ in scored], [i for _, i in scored], out / "reliability.png")
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown_report(report))
    save_box_grid(grid, out / "grid.png")
    logger.info("\n%s", markdown_table(rows))
    if skipped:
        logger.warning("%d record(s) skipped: %s", len(skipped), ", ".join(s["image_id"] for s in skipped))
    return rows


def is_qwen_vl(model) -> bool:
    """Whether the model is a Qwen-VL (the family the native grounding prompt is written for)."""
    model_type = getattr(getattr(model, "config", None), "model_type", "") or ""
    return model_type.startswith("qwen") and "vl" in model_type


def markdown_table(rows: dict[str, dict[str, float]], names: Sequence[str] = METRIC_NAMES) -> str:
    header = "| model | " + " | ".join(names) + " |\n|---|" + "---|" * len(names)
    lines = [f"| {name} | " + " | ".join(f"{m[k]:.3f}" for k in names) + " |" for name, m in rows.items()]
    return "\n".join([header, *lines])


def markdown_report(report: dict[str, Any]) -> str:
    skipped = "".join(f"\n- `{s['image_id']}`: {s['error']}" for s in report["skipped"]) or " none"
    return (f"# Box evaluation: `{report['adapter']}`\n\nDataset `{report['dataset']}`, split "
            f"`{report['split']}`: {report['evaluated']} images.\n\n{markdown_table(report['rows'])}\n\n"
            f"Center prior box ({report['center_prior_source']}): "
            f"{[round(v, 3) for v in report['center_prior_box']]}\n\n"
            f"{_native_note(report)}{_confidence_note(report)}"
            f"Skipped records:{skipped}\n\n![predictions](grid.png)\n")


def _native_note(report: dict[str, Any]) -> str:
    native = report.get("native_prompt")
    if not native:
        return ""
    return (f"Native row: the base model asked \"{native['instruction']}\", unconstrained; answers read as "
            f"Qwen-VL's `bbox_2d` on a 0-1000 grid, the {native['pick']} box where several are given.\n\n")


def confidence_sentence(c: dict[str, Any] | None) -> str:
    """One line on the box confidence's quality (empty without a calibration)."""
    if not c:
        return ""
    auroc = f"{c['confidence_auroc']:.3f}" if "confidence_auroc" in c else "n/a (one class only)"
    chance = (f" (a perfectly calibrated confidence would show {c['confidence_ece_chance']:.3f} on as many images "
              f"by chance, 90% of the time below {c['confidence_ece_chance_p90']:.3f})"
              if "confidence_ece_chance" in c else "")
    return (f"Confidence (P(IoU >= 0.5), calibrated on {c['calibrated_on']} validation images): "
            f"AUROC {auroc}, expected calibration error {c['confidence_ece']:.3f}{chance}.")


def _confidence_note(report: dict[str, Any]) -> str:
    line = confidence_sentence(report.get("confidence"))
    return f"{line}\n\n![reliability](reliability.png)\n\n" if line else ""


# --- the list tasks (objects, phrase) ------------------------------------------------------------


def list_prior(dataset: datasets.DatasetDict, split: str) -> tuple[Callable[[dict], list[LabelledBox]], str]:
    """A model-free answer per record from the train split (the evaluated split if there is none), and what it is.

    ``objects``: the mean number of objects per image (rounded), each at the mean box, labelled with
    the most frequent labels in turn. ``phrase``: one box, the mean box of the asked category.
    """
    source = dataset["train"] if "train" in dataset and len(dataset["train"]) else dataset[split]
    where = "the train split" if source is not dataset[split] else f"the evaluated split {split!r} (no train split)"
    labels, boxes = list(chain.from_iterable(source["labels"])), list(chain.from_iterable(source["boxes"]))
    if not boxes:
        return (lambda record: []), f"no boxes in {where}: the prior answers []"
    mean_box = Box(*np.asarray(boxes, dtype=float).mean(0).tolist())
    if source[0]["task"] == "phrase":
        per_label = {label: Box(*np.asarray([b for lab, b in zip(labels, boxes) if lab == label]).mean(0).tolist())
                     for label in set(labels)}
        return (lambda record: [LabelledBox(record["query"], per_label.get(record["query"], mean_box))],
                f"one box per question: the mean box of the asked category in {where}")
    count = round(len(boxes) / len(source))
    common = [label for label, _ in Counter(labels).most_common()]
    guess = [LabelledBox(common[i % len(common)], mean_box) for i in range(count)]
    return (lambda record: list(guess),
            f"{count} box(es) (the mean count per image) at the mean box, labelled {[o.label for o in guess]} "
            f"(the most frequent labels), from {where}")


def evaluate_lists(args: EvalArguments, dataset: datasets.DatasetDict, split: datasets.Dataset
                   ) -> dict[str, dict[str, float]]:
    """The rows adapter / base (no adapter) / prior on a split of an objects or phrase dataset."""
    prior, prior_source = list_prior(dataset, args.split)
    adapter_dir = resolve_adapter(args.adapter)
    model, processor = load_for_inference(adapter_dir, args.base)
    predictor = BoxPredictor(model, processor, answer_format=trained_answer_format(adapter_dir),
                             batch_size=args.batch_size, task=split[0]["task"], constrained=args.constrained,
                             labels=trained_labels(adapter_dir) or dataset_labels(split))
    has_base = adapter_base(adapter_dir) is not None and predictor.has_adapter
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    truths, found, base, guessed, grid, skipped = [], [], [], [], [], []
    found_scores, base_scores = [], []
    window = 4 * args.batch_size
    with open(out / "predictions.jsonl", "w") as f, tqdm(total=len(split), desc="Evaluating", unit="record") as bar:
        for start in range(0, len(split), window):
            records, bad = decode_records(split.select(range(start, min(start + window, len(split)))), processor)
            skipped += bad
            mine, theirs = _ask(predictor, records), _ask(predictor, records, adapter=False) if has_base else []
            for i, (record, p) in enumerate(zip(records, mine)):
                truth = record_objects(record)
                line = {"image_id": record["image_id"], "query": record["query"], "truth": _listed(truth),
                        "objects": _listed(p.objects, p.object_scores), "raw": p.raw}
                if theirs:
                    line["base_objects"] = _listed(theirs[i].objects, theirs[i].object_scores)
                    line["base_raw"] = theirs[i].raw
                f.write(json.dumps(line) + "\n")
                if len(grid) < args.grid_images:
                    grid.append((record["image"], truth, p.objects or [], record["query"] or None))
                truths.append(truth)
                found.append(p.objects)
                found_scores.append(p.object_scores)
                base += [theirs[i].objects] if theirs else []
                base_scores += [theirs[i].object_scores] if theirs else []
                guessed.append(prior(record))
            f.flush()
            bar.update(len(records) + len(bad))
    rows = {"adapter": detection_metrics(found, truths, found_scores)}
    if has_base:
        rows["base (no adapter)"] = detection_metrics(base, truths, base_scores)
    rows["prior"] = detection_metrics(guessed, truths)
    report = {"adapter": args.adapter, "dataset": args.dataset, "split": args.split, "task": split[0]["task"],
              "evaluated": len(truths), "skipped": skipped, "rows": rows, "prior": prior_source,
              "arguments": asdict(args)}
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    table = markdown_table(rows, DETECTION_METRIC_NAMES)
    skipped_md = "".join(f"\n- `{s['image_id']}`: {s['error']}" for s in skipped) or " none"
    (out / "report.md").write_text(
        f"# {report['task'].capitalize()} evaluation: `{args.adapter}`\n\nDataset `{args.dataset}`, split "
        f"`{args.split}`: {len(truths)} records.\n\n{table}\n\nPrior: {prior_source}.\n\n"
        f"Skipped records:{skipped_md}\n\n![predictions](grid.png)\n")
    save_objects_grid(grid, out / "grid.png")
    logger.info("\n%s", table)
    return rows


def _ask(predictor: BoxPredictor, records: list[dict[str, Any]], adapter: bool = True) -> list[Prediction]:
    """Predictions for records that may each ask their own question (phrase) or none (objects)."""
    results: list[Prediction | None] = [None] * len(records)
    for query in {r["query"] for r in records}:
        index = [i for i, r in enumerate(records) if r["query"] == query]
        answers = predictor.predict([records[i]["image"] for i in index], adapter=adapter, query=query or None)
        for i, answer in zip(index, answers):
            results[i] = answer
    return results  # type: ignore[return-value]


def _listed(objects: list[LabelledBox] | None, scores: list[float] | None = None) -> list[dict[str, Any]] | None:
    if objects is None:
        return None
    listed = [{"label": o.label, "box": list(o.box)} for o in objects]
    for item, score in zip(listed, scores or []):
        item["score"] = rounded(score)
    return listed
