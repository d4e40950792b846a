"""``bbox-sft eval``: the adapter, the base model without it, and the center prior, side by side.

Every report puts the three rows on the same split, so a user sees at once whether fine-tuning
helped. The base row runs the same model with the adapter switched off (peft's
``disable_adapter``), so the base weights are loaded once. Records whose image cannot be decoded
are skipped, counted and named in the report. The split is streamed a few batches at a time.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from tqdm.auto import tqdm

from .boxes import Box
from .data.prepare import load_or_build_dataset
from .decoding import Prediction
from .images import ImageError, open_image
from .metrics import METRIC_NAMES, box_metrics
from .predict import BoxPredictor, adapter_base, load_for_inference, trained_answer_format
from .visualize import save_box_grid

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
    prior, prior_source = center_prior(dataset, args.split)
    model, processor = load_for_inference(args.adapter, args.base)
    predictor = BoxPredictor(model, processor, answer_format=trained_answer_format(args.adapter),
                             constrained=args.constrained, batch_size=args.batch_size)
    has_base = adapter_base(args.adapter) is not None and hasattr(model, "disable_adapter")

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    truths, adapted, base, grid, skipped = [], [], [], [], []
    window = 4 * args.batch_size
    with open(out / "predictions.jsonl", "w") as f, tqdm(total=len(split), desc="Evaluating", unit="image") as bar:
        for start in range(0, len(split), window):
            records, bad = decode_records(split.select(range(start, min(start + window, len(split)))), processor)
            skipped += bad
            images = [r["image"] for r in records]
            mine = predictor.predict(images)
            theirs: list[Prediction | None] = [None] * len(images)
            if has_base:
                with model.disable_adapter():
                    theirs = predictor.predict(images)
            for record, p, b in zip(records, mine, theirs):
                line = {"image_id": record["image_id"], "truth": record["box"], "box": p.box, "raw": p.raw,
                        "confidence": round(p.confidence, 4)}
                if b is not None:
                    line["base_box"], line["base_raw"] = b.box, b.raw
                f.write(json.dumps(line) + "\n")
                if len(grid) < args.grid_images:
                    grid.append((record["image"], record["box"], p.box, f"{p.confidence:.2f}"))
            f.flush()
            truths += [r["box"] for r in records]
            adapted += [p.box for p in mine]
            base += [b.box for b in theirs if b is not None]
            bar.update(len(records) + len(bad))

    rows: dict[str, dict[str, float]] = {"adapter": box_metrics(adapted, truths)}
    if has_base:
        rows["base (no adapter)"] = box_metrics(base, truths)
    rows["center prior"] = box_metrics([prior] * len(truths), truths)
    report = {"adapter": args.adapter, "dataset": args.dataset, "split": args.split, "evaluated": len(truths),
              "skipped": skipped, "rows": rows, "center_prior_box": list(prior),
              "center_prior_source": prior_source, "arguments": asdict(args)}
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown_report(report))
    save_box_grid(grid, out / "grid.png")
    logger.info("\n%s", markdown_table(rows))
    if skipped:
        logger.warning("%d record(s) skipped: %s", len(skipped), ", ".join(s["image_id"] for s in skipped))
    return rows


def markdown_table(rows: dict[str, dict[str, float]]) -> str:
    header = "| model | " + " | ".join(METRIC_NAMES) + " |\n|---|" + "---|" * len(METRIC_NAMES)
    lines = [f"| {name} | " + " | ".join(f"{m[k]:.3f}" for k in METRIC_NAMES) + " |" for name, m in rows.items()]
    return "\n".join([header, *lines])


def markdown_report(report: dict[str, Any]) -> str:
    skipped = "".join(f"\n- `{s['image_id']}`: {s['error']}" for s in report["skipped"]) or " none"
    return (f"# Box evaluation: `{report['adapter']}`\n\nDataset `{report['dataset']}`, split "
            f"`{report['split']}`: {report['evaluated']} images.\n\n{markdown_table(report['rows'])}\n\n"
            f"Center prior box ({report['center_prior_source']}): "
            f"{[round(v, 3) for v in report['center_prior_box']]}\n\n"
            f"Skipped records:{skipped}\n\n![predictions](grid.png)\n")
