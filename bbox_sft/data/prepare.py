"""``bbox-sft prepare``: build the dataset with the builder, save it, report, draw and push."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from ..hub import dataset_card, objects_dataset_card, push_or_explain, refer_dataset_card
from ..tasks import get_task
from ..visualize import image_grid
from .builder import DUTS_CITATION, SaliencyBoxes, summary_line
from .detection_builder import DetectionBoxes, detection_summary_line
from .exports import describe_layouts, has_detection
from .refer import ReferBoxes, has_refer, refer_summary_line
from .sources import find_archives, find_pairs
from .splits import SPLITS, all_splits

logger = logging.getLogger(__name__)
REPORT_NAME = "build_report.json"


@dataclass(frozen=True)
class Source:
    """A data layout: how to tell it is there, what it looks like, and what builds, reports and cards it."""

    found: Callable[[str], bool]
    layout: str
    builder: type
    summary: Callable[[dict], str]
    card: Callable[[dict], str]


def _has_saliency(data_dir: str) -> bool:
    return Path(data_dir).is_dir() and bool(find_archives(data_dir) or find_pairs([data_dir])[0])


SOURCES: dict[str, Source] = {
    "saliency": Source(_has_saliency, "DUTS-TR.zip / DUTS-TE.zip, DUTS-*/DUTS-*-Image + DUTS-*-Mask folders, or "
                                      "images/ + masks/ folders", SaliencyBoxes, summary_line,
                       lambda report: dataset_card(report, DUTS_CITATION)),
    "detection": Source(has_detection, describe_layouts(), DetectionBoxes, detection_summary_line,
                        objects_dataset_card),
    "refer": Source(has_refer, "a JSON-lines file of {image, expression, bbox} (refs.jsonl), or a datasets "
                               "dataset with image, expression and bbox columns", ReferBoxes, refer_summary_line,
                    refer_dataset_card),
}


def find_source(task_name: str, data_dir: str) -> str:
    """The first of the task's data layouts found in ``data_dir``; an error listing them if none is."""
    task = get_task(task_name)
    found = next((s for s in task.sources if SOURCES[s].found(data_dir)), None)
    if found is None:
        layouts = "; or ".join(SOURCES[s].layout for s in task.sources)
        hint = " (bbox-sft prepare --download_help shows the saliency layouts)" if "saliency" in task.sources else ""
        raise FileNotFoundError(f"{data_dir}: no images found for the {task.name} task. Expected {layouts}{hint}.")
    return found


@dataclass
class PrepareArguments:
    """Arguments of ``bbox-sft prepare``."""

    data_dir: str = field(metadata={"help": "Folder with DUTS archives/folders or images/ + masks/ (task subject); "
                                            "a detection export: COCO, Roboflow's train/valid/test root, YOLO, "
                                            "Pascal VOC, or a datasets detection set (objects, phrase); "
                                            "referring expressions (refer)."})
    output_dir: str = field(metadata={"help": "Where the DatasetDict is saved (load_from_disk reads it)."})
    train_size: int = field(default=2000, metadata={"help": "Images in the train split (at most)."})
    val_size: int = field(default=500, metadata={"help": "Images in the validation split (at most)."})
    test_size: int = field(default=500, metadata={"help": "Images in the test split (at most)."})
    seed: int = field(default=42, metadata={"help": "Seed of the split hash."})
    box_mode: str = field(default="largest", metadata={"help": "largest | union | components"})
    threshold: int = field(default=128, metadata={"help": "Mask value from which a pixel is foreground."})
    min_fraction: float = field(default=0.25, metadata={
        "help": "components mode, and the objects task from masks: a component's least area vs the largest."})
    answer_format: str = field(default="json", metadata={"help": "json | qwen"})
    task: str = field(default="subject", metadata={
        "help": "subject (one box, from masks) | objects (every object) | phrase (the objects a prompt names) | "
                "refer (the object a description picks out)"})
    absent_per_image: int = field(default=1, metadata={
        "help": "phrase: categories an image does not hold asked per image (answer [])."})
    max_objects: int | None = field(default=None, metadata={
        "help": "objects, phrase: the most boxes an answer holds; an image with more keeps its largest (the others "
                "counted as lost). Default: no limit."})
    num_proc: int = field(default=1, metadata={"help": "Processes that read masks and write records."})
    visualize: bool = field(default=False, metadata={"help": "Write a PNG grid of images with their boxes."})
    push_to_hub: str | None = field(default=None, metadata={"help": "Hub dataset repo id to push to."})


def prepare_dataset(args: PrepareArguments) -> datasets.DatasetDict:
    """Build, save to ``args.output_dir`` with its report and card, then draw and push if asked."""
    output_dir = Path(args.output_dir)
    task = get_task(args.task)
    source = SOURCES[find_source(task.name, args.data_dir)]
    data_dir = args.data_dir if not Path(args.data_dir).exists() else str(Path(args.data_dir).resolve())
    options = dict(answer_format=args.answer_format, train_size=args.train_size, val_size=args.val_size,
                   test_size=args.test_size, seed=args.seed, num_proc=args.num_proc, task=task.name)
    if source.builder is SaliencyBoxes:
        options.update(box_mode=args.box_mode, threshold=args.threshold, min_fraction=args.min_fraction)
    elif source.builder is DetectionBoxes:
        options.update(absent_per_image=args.absent_per_image, max_objects=args.max_objects)
    # a fresh cache each time: the builder's cache key does not see files added to data_dir
    with tempfile.TemporaryDirectory(prefix="bbox_sft_build_") as cache_dir:
        builder = source.builder(cache_dir=cache_dir, data_dir=data_dir, **options)
        builder.download_and_prepare(num_proc=args.num_proc if args.num_proc > 1 else None)
        dataset = builder.as_dataset()
        empty = [split for split in SPLITS if split not in dataset]
        for split in empty:
            logger.warning("split %r is empty (asked for %d, %d usable images left for it)", split,
                           builder.report["requested_sizes"][split], builder.report["split_sizes"][split])
            dataset[split] = datasets.Dataset.from_dict({k: [] for k in task.features}, features=task.features)
        # our three splits first (empty ones too, so every folder loads the same way), then the source's others
        dataset = datasets.DatasetDict({split: dataset[split] for split in all_splits(dataset)})
        if output_dir.exists():
            shutil.rmtree(output_dir)
        # an empty split is saved as one empty shard: ``datasets`` would write none, which cannot be loaded
        dataset.save_to_disk(str(output_dir), num_shards={split: 1 for split in empty} or None)
    report = {**builder.report, "empty_splits": empty}
    (output_dir / REPORT_NAME).write_text(json.dumps(report, indent=2))
    (output_dir / "README.md").write_text(source.card(report))
    logger.info(source.summary(report))
    logger.info("saved to %s (report: %s)", output_dir, output_dir / REPORT_NAME)
    if args.visualize:
        shown = next((dataset[s] for s in SPLITS if len(dataset[s])), dataset["train"])
        logger.info("preview: %s", save_dataset_grid(shown, output_dir / "preview.png", task))
    if args.push_to_hub:
        push_dataset(dataset, args.push_to_hub, output_dir)
    return dataset


def save_dataset_grid(split: datasets.Dataset, path: Path, task, n: int = 16) -> Path:
    """PNG grid of the first ``n`` images with their boxes (green), captioned by the task."""
    task = get_task(task)
    rows = split.select(range(min(n, len(split))))
    image_grid([task.draw(r["image"], task.target(r), None, caption=task.preview_caption(r)) for r in rows]).save(path)
    return path


def push_dataset(dataset: datasets.DatasetDict, repo_id: str, local_dir: Path) -> None:
    """Push the records, then the card; offline, fail with a message saying the local copy is safe."""
    from huggingface_hub import DatasetCard

    card = DatasetCard((local_dir / "README.md").read_text())
    push_or_explain(lambda: dataset.push_to_hub(repo_id), repo_id, local_dir)
    push_or_explain(lambda: card.push_to_hub(repo_id), repo_id, local_dir)
    logger.info("pushed %s to the Hub as %s", local_dir, repo_id)


def load_or_build_dataset(
    dataset_name: str,
    data_dir: str | None = None,
    synthetic_images: int = 0,
    synthetic_domain: str = "plain",
    synthetic_seed: int = 0,
    **build_kwargs,
) -> datasets.DatasetDict:
    """The training data: a prepared folder, built first from ``data_dir`` if missing, or a Hub dataset.

    With ``synthetic_images``, a missing ``data_dir`` is filled with a synthetic set first, so a
    recipe on the embedded default runs on a fresh clone by itself.
    """
    path = Path(dataset_name)
    if (path / "dataset_dict.json").is_file():
        return datasets.load_from_disk(str(path))
    if data_dir is not None:
        if not Path(data_dir).exists() and synthetic_images > 0:
            from .synthetic import write_synthetic

            write_synthetic(get_task(build_kwargs.get("task", "subject")).sources, data_dir, n=synthetic_images,
                            seed=synthetic_seed, domain=synthetic_domain)
        if not Path(data_dir).exists():
            raise FileNotFoundError(f"data_dir {data_dir} does not exist (needed to build {dataset_name})")
        return prepare_dataset(PrepareArguments(data_dir=data_dir, output_dir=dataset_name, **build_kwargs))
    if path.exists():
        raise FileNotFoundError(f"{dataset_name} is not a prepared dataset (no dataset_dict.json in it)")
    try:
        return datasets.load_dataset(dataset_name)
    except Exception as error:
        raise FileNotFoundError(
            f"dataset {dataset_name!r} not found: no such local folder, and the Hub could not give it "
            f"({type(error).__name__}). Build it with `bbox-sft prepare --data_dir D --output_dir {dataset_name}` "
            "or set data_dir in the recipe."
        ) from error
