"""``bbox-sft eval``: the adapter, the base model without it, and the center prior, side by side.

Every report puts the three rows on the same split, so a user sees at once whether fine-tuning
helped. The base row runs the same model with the adapter switched off (peft's
``disable_adapter``), so the base weights are loaded once. Records whose image cannot be decoded
are skipped, counted and named in the report.
"""

from __future__ import annotations

import io
import json
import logging
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from PIL import Image

from .boxes import Box
from .data.prepare import load_or_build_dataset
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


def decode_records(split: datasets.Dataset) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Records with decoded images; the ones whose image does not decode are returned as skipped."""
    raw = split.cast_column("image", datasets.Image(decode=False))
    kept, skipped = [], []
    for record in raw:
        try:
            image = Image.open(io.BytesIO(record["image"]["bytes"]) if record["image"]["bytes"]
                               else record["image"]["path"])
            image.load()
            kept.append({**record, "image": image.convert("RGB")})
        except Exception as error:  # PIL raises many types for bad data
            logger.error("%s: cannot decode image (%s: %s); skipped", record["image_id"], type(error).__name__, error)
            skipped.append({"image_id": record["image_id"], "error": f"{type(error).__name__}: {error}"})
    return kept, skipped


def center_prior(dataset: datasets.DatasetDict, split: str) -> Box:
    """The mean training box (the evaluated split's own mean when there is no train split)."""
    source = dataset["train"] if "train" in dataset and len(dataset["train"]) else dataset[split]
    return Box(*np.asarray(source["box"], dtype=float).mean(0).tolist())


def evaluate_adapter(args: EvalArguments) -> dict[str, dict[str, float]]:
    """Score the three rows on ``args.split``; write metrics.json, report.md, predictions.jsonl, grid.png."""
    dataset = load_or_build_dataset(args.dataset)
    if args.split not in dataset:
        raise ValueError(f"{args.dataset} has no split {args.split!r} (it has {list(dataset)})")
    split = dataset[args.split]
    if args.max_samples:
        split = split.select(range(min(args.max_samples, len(split))))
    records, skipped = decode_records(split)
    images = [r["image"] for r in records]
    truths = [r["box"] for r in records]
    model, processor = load_for_inference(args.adapter, args.base)
    predictor = BoxPredictor(model, processor, answer_format=trained_answer_format(args.adapter),
                             constrained=args.constrained, batch_size=args.batch_size)

    rows: dict[str, dict[str, float]] = {}
    adapted = predictor.predict(images, progress=True)
    rows["adapter"] = box_metrics([p.box for p in adapted], truths)
    if adapter_base(args.adapter) is not None:
        with model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext():
            base = predictor.predict(images, progress=True)
        rows["base (no adapter)"] = box_metrics([p.box for p in base], truths)
    else:
        base = None
    prior = center_prior(dataset, args.split)
    rows["center prior"] = box_metrics([prior] * len(truths), truths)

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"adapter": args.adapter, "dataset": args.dataset, "split": args.split, "evaluated": len(records),
              "skipped": skipped, "rows": rows, "center_prior_box": list(prior), "arguments": asdict(args)}
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown_report(report))
    with open(out / "predictions.jsonl", "w") as f:
        for i, (record, p) in enumerate(zip(records, adapted)):
            line = {"image_id": record["image_id"], "truth": record["box"], "box": p.box, "raw": p.raw,
                    "confidence": round(p.confidence, 4)}
            if base is not None:
                line["base_box"], line["base_raw"] = base[i].box, base[i].raw
            f.write(json.dumps(line) + "\n")
    items = [(r["image"], r["box"], p.box, f"{p.confidence:.2f}") for r, p in zip(records, adapted)]
    save_box_grid(items[: args.grid_images], out / "grid.png")
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
            f"Center prior box (mean training box): {[round(v, 3) for v in report['center_prior_box']]}\n\n"
            f"Skipped records:{skipped}\n\n![predictions](grid.png)\n")
