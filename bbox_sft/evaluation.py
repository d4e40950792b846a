"""``bbox-sft eval``: the adapter, the base model without it, the base asked in its own words, and a prior.

One loop for every task: each report puts its rows on the same split, so a user sees at once
whether fine-tuning helped. The task (read from the run description saved with the adapter) gives
the metrics, the prior, the native prompt where Qwen-VL has one, and the pictures. The base row runs
the same model with the adapter switched off (peft's ``disable_adapter``), so the base weights are
loaded once. Records whose image cannot be decoded are skipped, counted and named in the report. The
split is streamed a few batches at a time.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
from tqdm.auto import tqdm

from .boxes import iou
from .calibration import Calibration, confidence_metrics, save_reliability_plot
from .data.prepare import load_or_build_dataset
from .data.splits import split_name
from .decoding import Prediction
from .images import ImageError, open_image
from .predict import BoxPredictor, Predictor, adapter_base, load_for_inference, resolve_adapter
from .saved_run import SavedRun
from .tasks import Task, get_task
from .visualize import image_grid

logger = logging.getLogger(__name__)


@dataclass
class EvalArguments:
    """Arguments of ``bbox-sft eval``."""

    adapter: str = field(metadata={"help": "Adapter (or full model) folder written by training, or a Hub id."})
    dataset: list[str] = field(metadata={
        "action": "extend",
        "help": "Prepared dataset folder or Hub id; a referring-expression source such as lmms-lab/RefCOCO is built "
                "first, its own splits kept. Several (--dataset A --dataset B): one table of every split scored. "
                "NAME:SPLITS (lmms-lab/RefCOCOg:val,test) gives a dataset its own splits."})
    output_dir: str = field(metadata={"help": "Where the reports, predictions and grid go."})
    split: str = field(default="test", metadata={
        "help": "Split(s) to evaluate: a name, several joined by commas, or all (every split but train)."})
    task: str | None = field(default=None, metadata={
        "help": "The task, for a model without a saved run (a Hub model asked zero-shot, e.g. --task refer)."})
    base: str | None = field(default=None, metadata={"help": "Base model (default: the adapter's own)."})
    limit: int | None = field(default=None, metadata={"help": "Evaluate the first N records of each split only."})
    batch_size: int = field(default=8, metadata={"help": "Images per generation batch."})
    constrained: bool = field(default=True, metadata={"help": "Constrained decoding (parse rate 1.0)."})
    grid_images: int = field(default=16, metadata={"help": "Predictions drawn in grid.png."})
    native_baseline: bool | None = field(
        default=None,
        metadata={"help": "Add the row of the base model asked in Qwen-VL's own grounding words, unconstrained, "
                          "for tasks that have such words (default: on when the base is a Qwen-VL)."},
    )
    native_pick: str = field(default="first", metadata={"help": "Native answers with several boxes: "
                                                                 "'first' or 'largest'."})
    native_max_new_tokens: int = field(default=128, metadata={"help": "Token budget of a native answer."})
    server: str | None = field(default=None, metadata={
        "help": "Ask a vLLM server started by `bbox-sft serve` (the URL it prints, or its OpenAI base .../v1) instead "
                "of loading the model here; the base rows come from the same server when it serves the adapter "
                "as a LoRA."})
    max_in_flight: int = field(default=8, metadata={"help": "--server: requests sent at once."})
    api_key: str | None = field(default=None, metadata={
        "help": "--server: the key the server was started with (default: OPENAI_API_KEY)."})

    def __post_init__(self) -> None:
        if isinstance(self.dataset, str):
            self.dataset = [self.dataset]


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


@dataclass
class Rows:
    """What an evaluation asks, the same for every split: the engine and which rows it scores."""

    predictor: Predictor
    task: Task
    calibration: Calibration | None
    has_base: bool
    native: bool
    parse_native: Any


def evaluate_adapter(args: EvalArguments) -> dict[str, dict[str, float]]:
    """Score the rows on each split asked of each dataset; per split, metrics.json, report.md, predictions.jsonl and
    grid.png (in ``output_dir``, or ``output_dir/<dataset>/<split>/`` when several are scored).

    One split: its rows ({row: {metric: value}}). Several: the benchmark table (``table.md``, ``table.json``), the
    task's headline metric (Acc@0.5 for refer) per split and its mean over the splits, {row: {column: value}}.
    """
    if args.native_pick not in ("first", "largest"):
        raise ValueError(f"native_pick must be 'first' or 'largest', got {args.native_pick!r}")
    adapter_dir = resolve_adapter(args.adapter)
    run = SavedRun.read(adapter_dir)
    task = get_task(args.task) if args.task else run.task
    out = Path(args.output_dir)
    asked = [(name, dataset, split) for name, splits in map(_named_splits, args.dataset)
             for dataset in [_load_records(name, task, out)] for split in _splits(splits or args.split, dataset, name)]
    rows = _rows(args, adapter_dir, run, task, asked[0][1][asked[0][2]])
    reports = {}
    for name, dataset, split in asked:
        where = out if len(asked) == 1 else out / _slug(name) / split
        reports[(name, split)] = evaluate_split(args, rows, dataset, split, where, name)
    if len(asked) == 1:
        return next(iter(reports.values()))["rows"]
    table = benchmark_table(reports, task, args.limit)
    (out / "table.json").write_text(json.dumps(table, indent=2))
    (out / "table.md").write_text(table_markdown(table))
    logger.info("\n%s", table_markdown(table))
    return table["rows"]


def _named_splits(spec: str) -> tuple[str, str | None]:
    """``NAME`` or ``NAME:SPLITS`` (a local path keeps a colon it holds when no such split list follows)."""
    name, _, splits = spec.rpartition(":")
    return (name, splits) if name and splits and "/" not in splits else (spec, None)


def _slug(name: str) -> str:
    return Path(name.rstrip("/")).name or name


def _load_records(name: str, task: Task, out: Path) -> datasets.DatasetDict:
    """A prepared dataset; a source in the task's data layout (a RefCOCO copy) is built first, whole, its splits kept
    (``out/data/<name>``)."""
    prepared = (Path(name) / "dataset_dict.json").is_file()
    dataset = load_or_build_dataset(name) if prepared or not Path(name).exists() else None  # a folder: a source
    first = next(iter(dataset.values()), None) if dataset is not None else None
    if dataset is not None and (first is None or "prompt" in first.column_names):
        return dataset
    from .data.prepare import PrepareArguments, prepare_dataset

    logger.info("%s is not a prepared dataset: building its %s records first, every split kept whole", name,
                task.name)
    whole = 10**9
    return prepare_dataset(PrepareArguments(data_dir=name, output_dir=str(out / "data" / _slug(name)), task=task.name,
                                            train_size=whole, val_size=whole, test_size=whole))


def _splits(spec: str, dataset: datasets.DatasetDict, name: str) -> list[str]:
    """The splits ``spec`` names in ``dataset`` (val means validation), or every split but train for ``all``; a
    name the dataset does not have is refused, with the names it does have."""
    have = [s for s in dataset if len(dataset[s])]
    if spec.strip() == "all":
        chosen = [s for s in have if s != "train"]
    else:
        chosen = [split_name(s.strip()) if split_name(s.strip()) in dataset else s.strip() for s in spec.split(",")]
    missing = [s for s in chosen if s not in dataset]
    if missing:
        raise ValueError(f"{name} has no split {', '.join(map(repr, missing))} (it has {list(dataset)})")
    empty = [s for s in chosen if not len(dataset[s])]
    if empty or not chosen:
        raise ValueError(f"{name}: split {', '.join(map(repr, empty))} is empty, nothing to evaluate (splits with "
                         f"records: {have})")
    return chosen


def _rows(args: EvalArguments, adapter_dir: Path, run: SavedRun, task: Task, split: datasets.Dataset) -> Rows:
    """The engine (local, or a vLLM server) and the rows it can score."""
    labels = run.labels or task.labels(split)
    calibration = Calibration.load(adapter_dir) if task.calibrates else None
    predictor: Predictor
    if args.server is not None:
        from .server_client import ServerPredictor

        predictor = ServerPredictor.from_pretrained(adapter_dir, args.server, constrained=args.constrained,
                                                    calibration=calibration, task=task, labels=labels,
                                                    max_in_flight=args.max_in_flight, api_key=args.api_key)
        has_base, qwen_vl = predictor.has_base, True  # a vLLM server runs Qwen-VL models here
    else:
        model, processor = load_for_inference(adapter_dir, args.base)
        predictor = BoxPredictor(model, processor, answer_format=run.answer_format.name, constrained=args.constrained,
                                 batch_size=args.batch_size, calibration=calibration, task=task,
                                 labels=labels, max_objects=run.max_objects)
        has_base, qwen_vl = adapter_base(adapter_dir) is not None and predictor.has_adapter, is_qwen_vl(model)
    native = task.native_row is not None and (
        args.native_baseline if args.native_baseline is not None else has_base and qwen_vl)
    parse_native = functools.partial(task.parse_native, pick=args.native_pick) if native else None
    return Rows(predictor, task, calibration, has_base, native, parse_native)


def evaluate_split(args: EvalArguments, engine: Rows, dataset: datasets.DatasetDict, which: str, out: Path,
                   dataset_name: str) -> dict[str, Any]:
    """Score every row on one split; write metrics.json, report.md, predictions.jsonl, grid.png into ``out``.

    Streams: a window of a few batches is decoded (shrunk to the processor's size), predicted with and without the
    adapter, written to predictions.jsonl and dropped, so memory does not grow with the split.
    """
    task, predictor, calibration = engine.task, engine.predictor, engine.calibration
    split = dataset[which]
    if args.limit:
        split = split.select(range(min(args.limit, len(split))))
    task.check_dataset(split, dataset_name)
    prior = task.prior(dataset, which)
    processor = predictor.processor
    out.mkdir(parents=True, exist_ok=True)
    rows_of: dict[str, list[Prediction]] = {"adapter": [], "base": [], "native": []}
    truths, guessed, grid, skipped = [], [], [], []
    window = 4 * args.batch_size
    with open(out / "predictions.jsonl", "w") as f, tqdm(total=len(split), desc=f"Evaluating {which}",
                                                         unit="record") as bar:
        for start in range(0, len(split), window):
            records, bad = decode_records(split.select(range(start, min(start + window, len(split)))), processor)
            skipped += bad
            images, queries = [r["image"] for r in records], [task.query(r) for r in records]
            mine = predictor.predict(images, query=queries)
            theirs: list[Prediction | None] = [None] * len(images)
            asked: list[Prediction | None] = [None] * len(images)
            if engine.has_base:
                theirs = predictor.predict(images, query=queries, adapter=False)
            if engine.native:
                asked = predictor.native(images, [task.native_instruction(q) for q in queries], engine.parse_native,
                                         args.native_max_new_tokens)
            for record, p, b, q in zip(records, mine, theirs, asked):
                line = {"image_id": record["image_id"], **({"query": record["query"]} if "query" in record else {}),
                        "truth": task.truth_json(record), **task.answer_json(p)}
                if b is not None:
                    line.update(task.answer_json(b, "base_", confidence=False))
                if q is not None:
                    line.update(task.answer_json(q, "native_", confidence=False))
                f.write(json.dumps(line) + "\n")
                if len(grid) < args.grid_images:
                    grid.append(task.draw(record["image"], task.target(record), task.answer(p),
                                          task.caption(record, p)))
                truths.append(task.target(record))
                guessed.append(prior.answer(record))
            f.flush()
            rows_of["adapter"] += mine
            rows_of["base"] += [b for b in theirs if b is not None]
            rows_of["native"] += [q for q in asked if q is not None]
            bar.update(len(records) + len(bad))

    def score(predictions: list[Prediction]) -> dict[str, float]:
        return task.score([task.answer(p) for p in predictions], truths, [task.scores(p) for p in predictions])

    rows: dict[str, dict[str, float]] = {"adapter": score(rows_of["adapter"])}
    if engine.has_base:
        rows["base (no adapter)"] = score(rows_of["base"])
    if engine.native:
        rows[task.native_row] = score(rows_of["native"])
    rows[task.prior_row] = task.score(guessed, truths)
    report = {"adapter": args.adapter, "dataset": dataset_name, "split": which, "task": task.name,
              "evaluated": len(truths), "skipped": skipped, "rows": rows, **prior.report, "arguments": asdict(args)}
    if engine.native:
        report["native_prompt"] = {"instruction": task.native_instruction("{query}"), "pick": args.native_pick}
    if calibration is not None:
        ious = [iou(p.box, t) for p, t in zip(rows_of["adapter"], truths)]
        confidences = [p.confidence for p in rows_of["adapter"]]
        report["confidence"] = {**confidence_metrics(confidences, ious), "calibrated_on": calibration.fitted_on}
        scored = [(c, i) for c, i in zip(confidences, ious) if c is not None]
        save_reliability_plot([c for c, _ in scored], [i for _, i in scored], out / "reliability.png")
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown_report(report, task, prior.description))
    image_grid(grid).save(out / "grid.png")
    logger.info("%s %s:\n%s", dataset_name, which, markdown_table(rows, task.metric_names))
    if skipped:
        logger.warning("%d record(s) skipped: %s", len(skipped), ", ".join(s["image_id"] for s in skipped))
    return report


TABLE_METRIC_NAMES = {"success@0.5": "Acc@0.5 (IoU >= 0.5)", "mean_iou": "mean IoU", "f1@0.5": "F1@0.5"}


def benchmark_table(reports: dict[tuple[str, str], dict[str, Any]], task: Task, limit: int | None) -> dict[str, Any]:
    """Each row's headline metric (the task's: Acc@0.5 for refer) on each dataset's split, and its mean over the
    splits (each split counting once, as papers average them)."""
    metric = task.metric_for_best_model.removeprefix("eval_")
    columns = {f"{_slug(name)} {split}": report for (name, split), report in reports.items()}
    names = list(next(iter(columns.values()))["rows"])
    rows = {row: {column: report["rows"][row][metric] for column, report in columns.items()} for row in names}
    for values in rows.values():
        values["average"] = sum(values.values()) / len(columns)
    scored = ", ".join(f"{column} {report['evaluated']}" for column, report in columns.items())
    caption = (f"{TABLE_METRIC_NAMES.get(metric, metric)} per split, and the mean over the {len(columns)} splits. "
               f"Records scored: {scored}.")
    if limit:
        caption += f" Only the first {limit} records of each split (--limit {limit}): a quick look, not the benchmark."
    table = {"metric": metric, "columns": [*columns, "average"], "rows": rows, "caption": caption, "limit": limit,
             "evaluated": {c: r["evaluated"] for c, r in columns.items()}}
    confidence = {c: r["confidence"] for c, r in columns.items() if r.get("confidence")}
    if confidence:
        table["confidence"] = confidence
    return table


def table_markdown(table: dict[str, Any]) -> str:
    header = "| model | " + " | ".join(table["columns"]) + " |\n|---|" + "---|" * len(table["columns"])
    lines = [f"| {row} | " + " | ".join(f"{values[c]:.3f}" for c in table["columns"]) + " |"
             for row, values in table["rows"].items()]
    text = "\n".join([header, *lines]) + f"\n\n{table['caption']}\n"
    if table.get("confidence"):
        text += "\nAdapter's confidence (P(IoU >= 0.5)) per split: " + "; ".join(
            f"{c} AUROC {v['confidence_auroc']:.3f}, ECE {v['confidence_ece']:.3f}" if "confidence_auroc" in v
            else f"{c} ECE {v['confidence_ece']:.3f}" for c, v in table["confidence"].items()) + ".\n"
    return text


def is_qwen_vl(model) -> bool:
    """Whether the model is a Qwen-VL (the family the native grounding prompt is written for)."""
    model_type = getattr(getattr(model, "config", None), "model_type", "") or ""
    return model_type.startswith("qwen") and "vl" in model_type


def markdown_table(rows: dict[str, dict[str, float]], names: Sequence[str]) -> str:
    header = "| model | " + " | ".join(names) + " |\n|---|" + "---|" * len(names)
    lines = [f"| {name} | " + " | ".join(f"{m[k]:.3f}" for k in names) + " |" for name, m in rows.items()]
    return "\n".join([header, *lines])


def markdown_report(report: dict[str, Any], task: Task, prior: str) -> str:
    skipped = "".join(f"\n- `{s['image_id']}`: {s['error']}" for s in report["skipped"]) or " none"
    return (f"# {task.title} evaluation: `{report['adapter']}`\n\nDataset `{report['dataset']}`, split "
            f"`{report['split']}`: {report['evaluated']} records.\n\n"
            f"{markdown_table(report['rows'], task.metric_names)}\n\n{task.prior_row.capitalize()}: {prior}.\n\n"
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


