"""Referring expressions -> chat records for the ``refer`` task, as a ``datasets`` builder.

Two sources:

- JSON lines (``refs.jsonl``, or any one ``*.jsonl`` in ``data_dir``, or the file itself):
  ``{"image": "images/x.jpg", "expression": "the small blue star at the top", "bbox": [x, y, w, h]}``,
  the box in pixels as COCO writes it, the image path relative to the file;
- a ``datasets`` dataset (a folder written by ``save_to_disk``, or a Hub id) with an ``image`` column,
  an expression column (``expression``, ``sentence``, ``sentences``, ``answer``, ``ref`` or ``caption``:
  a string or a list of strings, each its own record; the RefCOCO copies such as ``lmms-lab/RefCOCO``
  keep them in ``answer``) and ``bbox`` (COCO ``[x, y, w, h]`` pixels). Its images are written to the
  build's cache folder and read from there like any file.

Several expressions of one image become several records, and splits are drawn by image
(hash-stable), so one image never straddles two splits. Images are checked as the other builders
check them, boxes as COCO boxes are (:mod:`bbox_sft.data.detections`); what cannot be used is skipped and
counted by reason in :attr:`ReferBoxes.report`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import datasets
from tqdm.auto import tqdm

from ..hub import counts
from ..tasks import Annotation, get_task
from .checks import check_image, image_bytes
from .config import BoxesConfig
from .detections import coco_box
from .sources import is_dataset_source, load_dataset_source
from .splits import SPLITS, all_splits, assign_splits, hash_unit, size_of, split_name

logger = logging.getLogger(__name__)
REFER_FILE = "refs.jsonl"
EXPRESSION_COLUMNS = ("expression", "sentence", "sentences", "answer", "ref", "caption")


@dataclass(frozen=True)
class ReferRow:
    """One expression as read: its image file, its text, its box as written (COCO pixels), and the split the
    source put it in (our name for it; None for an unsplit source)."""

    image: str
    expression: Any
    bbox: Any
    split: str | None = None


def find_refer_file(data_dir: str | Path) -> Path | None:
    """The JSON-lines file of ``data_dir`` (``refs.jsonl``, else the only ``*.jsonl``), or the file itself."""
    path = Path(data_dir)
    if path.is_file() and path.suffix == ".jsonl":
        return path
    if (path / REFER_FILE).is_file():
        return path / REFER_FILE
    found = sorted(path.glob("*.jsonl")) if path.is_dir() else []
    return found[0] if len(found) == 1 else None


def has_refer(data_dir: str | Path) -> bool:
    """Whether ``data_dir`` holds referring expressions this module reads (a Hub id counts when offline too:
    loading it says what is wrong)."""
    return find_refer_file(Path(data_dir)) is not None or is_dataset_source(data_dir)


def read_jsonl(path: Path) -> tuple[list[ReferRow], Counter, dict[str, str]]:
    """The rows of a JSON-lines file; lines that are not JSON objects with the three fields, skipped by reason."""
    rows, skipped, examples = [], Counter(), {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError:
            value = None
        if not isinstance(value, dict) or not isinstance(value.get("image"), str):
            skipped["bad_line"] += 1
            examples.setdefault("bad_line", f"{path.name}:{number}: {line[:160]}")
            continue
        image = value["image"] if Path(value["image"]).is_absolute() else str(path.parent / value["image"])
        rows.append(ReferRow(image, value.get("expression"), value.get("bbox")))
    return rows, skipped, examples


def _expressions(value: Any) -> list[Any]:
    """A dataset cell's expressions: a string, a list of strings, or RefCOCO's list of {"sent" / "raw"}."""
    if isinstance(value, list):
        return [v.get("sent") or v.get("raw") if isinstance(v, dict) else v for v in value]
    return [value]


def rows_from_dataset(source: str, image_dir: Path) -> list[ReferRow]:
    """The rows of a ``datasets`` dataset, each with its split (val -> validation; RefCOCO's testA, testB kept),
    its images written under ``image_dir``."""
    loaded = load_dataset_source(source)
    splits = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for source_split, split in splits:
        column = next((c for c in EXPRESSION_COLUMNS if c in split.column_names), None)
        if "image" not in split.column_names or "bbox" not in split.column_names or column is None:
            raise ValueError(f"{source}: a referring-expression dataset needs image, bbox and one of "
                             f"{EXPRESSION_COLUMNS} columns; it has {split.column_names}")
        raw = split.cast_column("image", datasets.Image(decode=False))
        for record in tqdm(raw, desc="Reading the dataset", unit="row"):
            data = record["image"]["bytes"] or Path(record["image"]["path"]).read_bytes()
            name = Path(record.get("file_name") or record["image"].get("path") or "").stem
            name = name or hashlib.sha1(data).hexdigest()[:16]  # the same image, the same file
            path = image_dir / f"{name}.img"
            if not path.exists():
                path.write_bytes(data)
            ours = split_name(source_split) if source_split is not None else None
            rows += [ReferRow(str(path), text, record["bbox"], ours) for text in _expressions(record[column])]
    return rows


@dataclass
class ReferBoxesConfig(BoxesConfig):
    """The options every builder takes (split sizes in images)."""

    source: ClassVar[str] = "refer"
    task: str = "refer"


class ReferBoxes(datasets.GeneratorBasedBuilder):
    """Images with a box per referring expression, as TRL vision prompt/completion records."""

    BUILDER_CONFIG_CLASS = ReferBoxesConfig
    VERSION = datasets.Version("1.0.0")

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(description="Boxes of referring expressions.",
                                    features=get_task(self.config.task).features)

    def _split_generators(self, dl_manager: datasets.DownloadManager) -> list[datasets.SplitGenerator]:
        config: ReferBoxesConfig = self.config
        if not config.data_dir:
            raise ValueError("ReferBoxes needs data_dir: a JSON-lines file of expressions or a datasets dataset")
        file = find_refer_file(config.data_dir)
        if file is not None:
            rows, skipped, examples = read_jsonl(file)
        else:
            rows, skipped, examples = rows_from_dataset(config.data_dir, Path(self.cache_dir) / "images"), Counter(), {}
        paths = sorted({row.image for row in rows})
        checks = dict(zip(paths, tqdm(map(check_image, paths), total=len(paths), desc="Checking images",
                                      unit="image")))
        by_image: dict[tuple[str | None, str], list[tuple[str, Any]]] = defaultdict(list)  # (split, image): exprs
        fixed: Counter = Counter()
        for row in rows:
            check = checks[row.image]
            if check.skip is not None:
                continue
            if not isinstance(row.expression, str) or not row.expression.strip():
                skipped["bad_expression"] += 1
                examples.setdefault("bad_expression", json.dumps(asdict(row))[:200])
                continue
            box, note = coco_box(row.bbox, check.width, check.height)
            if box is None:
                skipped[note] += 1
                examples.setdefault(note, json.dumps(asdict(row))[:200])
                continue
            if note:
                fixed[note] += 1
            by_image[(row.split, row.image)].append((" ".join(row.expression.split()), box))
        skipped_files = [{"image": path, "reason": check.skip, "detail": check.detail}
                         for path, check in checks.items() if check.skip]
        lost = Counter(row.image for row in rows if checks[row.image].skip)
        split_sizes = {"train": config.train_size, "validation": config.val_size, "test": config.test_size}
        source_splits = list(dict.fromkeys(row.split for row in rows if row.split is not None))
        if source_splits:  # the source's own splits, each its first images in hash order up to its size
            splits = all_splits(source_splits)
            split_ids = {s: sorted((Path(path).stem for own, path in by_image if own == s),
                                   key=lambda i: hash_unit(i, config.seed))[: size_of(s, split_sizes)]
                         for s in splits}
            path_of = {(own, Path(path).stem): path for own, path in by_image}
        else:  # an unsplit source: by image, hash-stable
            splits = list(SPLITS)
            ids = {Path(path).stem: path for _, path in by_image}
            split_ids = assign_splits(list(ids), split_sizes, seed=config.seed)
            path_of = {(None, i): path for i, path in ids.items()}
        task = get_task(config.task)
        plans = {}
        for split in splits:
            own = split if source_splits else None
            plans[split] = [{"image_id": i, "path": path_of[(own, i)], "check": checks[path_of[(own, i)]],
                             "example": e} for i in split_ids[split] for e in task.examples(
                                 i, Annotation(expressions=tuple(by_image[(own, path_of[(own, i)])])), [])]
        self.report = {
            "data_dir": str(config.data_dir),
            "source": str(file) if file is not None else "datasets dataset",
            "task": config.task,
            "images_found": len(paths),
            "usable": len({path for _, path in by_image}),
            "source_splits": source_splits or None,
            "expressions_found": len(rows),
            "expressions": sum(len(v) for v in by_image.values()),
            "skipped": dict(Counter(f["reason"] for f in skipped_files)),
            "skipped_expressions": {**dict(skipped), **({"image_skipped": sum(lost.values())} if lost else {})},
            "fixed": dict(fixed),
            "handled": dict(Counter(h for path in {path for _, path in by_image} for h in checks[path].handled)),
            "requested_sizes": split_sizes,
            "split_sizes": {split: len(v) for split, v in split_ids.items()},
            "split_records": {split: len(p) for split, p in plans.items()},
            "config": {k: v for k, v in asdict(config).items() if k not in ("data_files", "version", "description")},
            "skipped_files": skipped_files,
            "skipped_expression_examples": examples,
        }
        logger.info(refer_summary_line(self.report))
        return [datasets.SplitGenerator(name=split, gen_kwargs={"plans": plans[split]}) for split in splits
                if plans[split]]

    def _generate_examples(self, plans: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
        task, answer_format = get_task(self.config.task), self.config.answer_format
        for plan in plans:
            check, example = plan["check"], plan["example"]
            yield example.key, {
                "image": image_bytes(plan["path"], check.reencode), "image_id": plan["image_id"],
                "width": check.width, "height": check.height,
                **task.record(example.query, example.target, answer_format),
            }


def refer_summary_line(report: dict[str, Any]) -> str:
    splits = " / ".join(f"{s} {n} images ({report['split_records'][s]} records)"
                        for s, n in report["split_sizes"].items())
    return (f"{report['images_found']} images found, {report['usable']} usable with {report['expressions']} of "
            f"{report['expressions_found']} expressions; skipped images: {counts(report['skipped'])}; skipped "
            f"expressions: {counts(report['skipped_expressions'])}; fixed: "
            f"{counts({**report['fixed'], **report['handled']})}; splits: {splits}")
