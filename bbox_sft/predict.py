"""Prediction: base model + adapter loaded with peft, image(s) in, boxes out.

    predictor = BoxPredictor.from_pretrained("outputs/qwen3vl-2b-bbox-lora")
    [prediction] = predictor.predict([Image.open("photo.jpg")])
    prediction.box, prediction.confidence  # P(IoU >= 0.5), from the calibration saved with the adapter

The adapter is a local folder or a Hub repo id (downloaded with ``huggingface_hub``). The base
model id is read from the adapter's ``adapter_config.json`` (or given with ``base``); a folder
holding a full model (a run with ``use_peft: false``) loads directly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch
from PIL import Image
from transformers import PreTrainedModel, ProcessorMixin

from .calibration import Calibration
from .data.sources import IMAGE_SUFFIXES
from .decoding import Prediction, generate_answers
from .images import ImageError, open_image
from .model import detect_device, load_model, load_processor
from .saved_run import SavedRun
from .tasks import Task, get_task

logger = logging.getLogger(__name__)


class AdapterError(ValueError):
    """A missing adapter folder, or an adapter that does not fit its base model."""


def resolve_adapter(adapter: str | Path) -> Path:
    """The local folder of an adapter given as a folder or as a Hub repo id ("owner/name").

    A repo id is fetched with ``huggingface_hub.snapshot_download`` (from the local cache when
    offline), as ``PeftModel.from_pretrained`` would, so the processor and the calibration saved
    beside the adapter come with it.
    """
    path = Path(adapter)
    if path.is_dir():
        return path
    name = str(adapter)
    if name.count("/") == 1 and not name.startswith((".", "/", "~")) and not path.exists():
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(name))
        except Exception as error:  # offline, unknown repo, no access: all mean the same to the user
            raise AdapterError(f"adapter {name}: no such local folder, and the Hub repo could not be fetched "
                               f"({type(error).__name__}: {error})") from error
    raise AdapterError(f"adapter folder {adapter} does not exist")


def adapter_base(adapter_dir: str | Path) -> str | None:
    """The base model an adapter was trained on (None for a full model folder)."""
    adapter_dir = Path(adapter_dir)
    config = adapter_dir / "adapter_config.json"
    if config.is_file():
        return json.loads(config.read_text()).get("base_model_name_or_path")
    if (adapter_dir / "config.json").is_file():
        return None
    raise AdapterError(f"{adapter_dir}: no adapter_config.json or config.json (not an adapter or model folder)")


def load_for_inference(adapter_dir: str | Path, base: str | None = None, load_adapter: bool = True,
                       dtype: torch.dtype | None = None) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Base model (+ the peft adapter unless ``load_adapter`` is False) and the processor saved with it, on this
    machine's device in its precision (``dtype`` overrides it)."""
    from peft import PeftModel

    adapter_dir = resolve_adapter(adapter_dir)
    trained_on = adapter_base(adapter_dir)
    base = base or trained_on or str(adapter_dir)
    setup = detect_device()
    quantization = trained_quantization(adapter_dir, setup, dtype)
    model = load_model(base, setup, dtype=dtype, quantization=quantization)
    if trained_on is not None and load_adapter:
        try:
            model = PeftModel.from_pretrained(model, str(adapter_dir), torch_device=setup.device)
        except (RuntimeError, ValueError, KeyError) as error:  # shape mismatches, missing modules
            raise AdapterError(
                f"adapter {adapter_dir} does not fit base model {base} (trained on {trained_on}): {error}"
            ) from error
    if quantization is None:  # a quantized model is placed as it loads (and refuses .to)
        model.to(setup.device)
    processor_dir = adapter_dir if (adapter_dir / "processor_config.json").is_file() else base
    processor = load_processor(str(processor_dir))
    return model, processor


def trained_quantization(adapter_dir: Path, setup, dtype: torch.dtype | None = None):
    """The quantization a QLoRA adapter was trained and validated on, to load its base the same way (CUDA with
    bitsandbytes, no other dtype asked); None where there is none or it cannot be reproduced here (said once:
    the base then loads unquantized, and answers may differ from those measured in training)."""
    saved = SavedRun.read(adapter_dir).quantization
    if not saved:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        reason = "bitsandbytes is not installed (pip install 'bbox-sft[qlora]')"
    else:
        reason = None if setup.device == "cuda" else f"bitsandbytes needs CUDA, this machine runs on {setup.device}"
    if dtype is not None:
        reason = f"the base is asked for in {dtype} (a merge adds to full-precision weights)"
    if reason is None:
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig.from_dict(saved)
    mode = "4-bit " + str(saved.get("bnb_4bit_quant_type")) if saved.get("load_in_4bit") else "8-bit"
    logger.warning("%s was trained on a %s base; it is loaded here on the unquantized base (%s), so its answers "
                   "may differ from those validated in training", adapter_dir, mode, reason)
    return None


@dataclass
class ImageResult:
    """A prediction for one file, or the reason it has none."""

    path: str
    prediction: Prediction | None
    width: int = 0
    height: int = 0
    error: str | None = None
    reason: str | None = None  # the error's short key, for counts (missing_file, unreadable_image, server_refused)
    query: str | None = None  # what a phrase or refer model was asked for
    task: Task = field(default_factory=lambda: get_task("subject"))

    def to_json(self) -> dict:
        if self.prediction is None:
            return {"image": self.path, "error": self.error}
        return {"image": self.path, **self.task.result_json(self.prediction, self.width, self.height, self.query)}


class Predictor:
    """What answers a task's question with boxes, whatever the engine: :class:`BoxPredictor` runs the model
    here (transformers + our decoder), :class:`~bbox_sft.server_client.ServerPredictor` asks a vLLM server.
    Both give the same :class:`~bbox_sft.decoding.Prediction` for the same image; predict and eval take either."""

    task: Task
    processor: ProcessorMixin

    @property
    def has_base(self) -> bool:
        """Whether the base model can be asked too (``predict(..., adapter=False)``)."""
        raise NotImplementedError

    def predict(self, images: Sequence[Image.Image], progress: bool = False, adapter: bool = True,
                query: str | Sequence[str | None] | None = None) -> list[Prediction]:
        raise NotImplementedError

    def native(self, images: Sequence[Image.Image], instructions: Sequence[str],
               parse: Callable[[str], object], max_new_tokens: int) -> list[Prediction]:
        """The base model's unconstrained answers to ``instructions`` (Qwen-VL's own words), read by ``parse``."""
        raise NotImplementedError

    def predict_files(self, paths: Iterable[str | Path], window: int | None = None, adapter: bool = True,
                      query: str | Sequence[str | None] | None = None) -> Iterator[ImageResult]:
        """Results for image files in the order given (``query``: one for every file, or one per file); a file
        that cannot be read gets a result with its error and the rest go on."""
        raise NotImplementedError

    def _queries(self, images: Sequence[Image.Image], query: str | Sequence[str | None] | None) -> list[str | None]:
        """One query per image, each one the task accepts."""
        queries = list(query) if isinstance(query, (list, tuple)) else [query] * len(images)
        if len(queries) != len(images):
            raise ValueError(f"{len(queries)} queries for {len(images)} images")
        for q in set(queries) if isinstance(query, (list, tuple)) else {query}:  # checked even for no images
            self.task.check_query(q)
        return queries

    @staticmethod
    def saved_kwargs(adapter_dir: Path, kwargs: dict) -> dict:
        """``kwargs`` completed with what the run saved beside its model: task, answer format, labels, the list
        bound and the calibration (what a user passes wins)."""
        saved = SavedRun.read(adapter_dir)
        kwargs.setdefault("answer_format", saved.answer_format.name)
        kwargs.setdefault("task", saved.task)
        kwargs.setdefault("labels", saved.labels)
        kwargs.setdefault("max_objects", saved.max_objects)
        kwargs.setdefault("calibration", Calibration.load(adapter_dir))
        return kwargs


class BoxPredictor(Predictor):
    """A model that answers its task's question with boxes: one image or many, one query or one per image."""

    def __init__(self, model: PreTrainedModel, processor: ProcessorMixin, answer_format: str = "json",
                 constrained: bool = True, batch_size: int = 8, calibration: Calibration | None = None,
                 task: str | Task = "subject", max_new_tokens: int | None = None,
                 labels: Sequence[str] | None = None, max_objects: int | None = None) -> None:
        self.task = get_task(task)
        self.labels = list(labels) if labels is not None else None  # list tasks: what constrained answers may name
        self.max_objects = max_objects  # list tasks: the longest answer training saw (the grammar's bound)
        self.max_new_tokens = max_new_tokens  # None: the task's budget for its grammar
        self.model = model
        self.calibration = calibration
        self.processor = processor
        self.answer_format = answer_format
        self.constrained = constrained
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, adapter: str | Path, base: str | None = None, **kwargs) -> BoxPredictor:
        """Load an adapter folder or Hub repo id (with its base model, processor, run description and calibration)."""
        adapter_dir = resolve_adapter(adapter)
        model, processor = load_for_inference(adapter_dir, base)
        return cls(model, processor, **cls.saved_kwargs(adapter_dir, kwargs))

    @property
    def has_adapter(self) -> bool:
        """Whether the model carries a peft adapter that can be turned off (not a merged or full model)."""
        return hasattr(self.model, "disable_adapter")

    @contextlib.contextmanager
    def without_adapter(self) -> Iterator[None]:
        """The base model's answers inside this block: peft's ``disable_adapter``, nothing reloaded."""
        if not self.has_adapter:
            raise AdapterError("this model has no adapter to turn off (a full or merged model)")
        with self.model.disable_adapter():
            yield

    def predict(self, images: Sequence[Image.Image], progress: bool = False, adapter: bool = True,
                query: str | Sequence[str | None] | None = None) -> list[Prediction]:
        """Answers for ``images``; ``adapter=False`` asks the base model (no confidence: it is not calibrated).

        ``query`` is what a phrase model finds (a category) or a refer model locates (a description):
        one for every image, or one per image. Questions that share a grammar share batches.
        """
        queries = self._queries(images, query)
        options = dict(task=self.task, answer_format=self.answer_format, constrained=self.constrained,
                       batch_size=self.batch_size, progress=progress, labels=self.labels,
                       max_new_tokens=self.max_new_tokens, max_objects=self.max_objects,
                       calibration=self.calibration if adapter and self.task.calibrates else None)
        results: list[Prediction | None] = [None] * len(images)
        groups: dict[str | None, list[int]] = {}
        for i, q in enumerate(queries):
            groups.setdefault(self.task.grammar_key(q), []).append(i)
        with contextlib.nullcontext() if adapter else self.without_adapter():
            for key, index in groups.items():
                answers = generate_answers(self.model, self.processor, [images[i] for i in index],
                                           instruction=[self.task.instruction(queries[i]) for i in index],
                                           query=key, **options)
                for i, answer in zip(index, answers):
                    results[i] = answer
        return results  # type: ignore[return-value]

    @property
    def has_base(self) -> bool:
        return self.has_adapter

    def native(self, images, instructions, parse, max_new_tokens) -> list[Prediction]:
        with self.without_adapter() if self.has_adapter else contextlib.nullcontext():
            return generate_answers(self.model, self.processor, images, task=self.task, constrained=False,
                                    batch_size=self.batch_size, max_new_tokens=max_new_tokens, progress=False,
                                    instruction=list(instructions), parse=parse)

    def predict_files(self, paths: Iterable[str | Path], window: int | None = None, adapter: bool = True,
                      query: str | Sequence[str | None] | None = None) -> Iterator[ImageResult]:
        """Results for image files, in the order given, a window of a few batches at a time.

        Each image is decoded small and shrunk to the processor's size as it is read, and at most
        ``window`` images (default: 4 batches) are held at once, so memory does not grow with the
        number of files. A file that cannot be read gets a result with its error; the rest go on.
        ``query``: one for every file, or one per file.
        """
        window = window or 4 * self.batch_size
        queries = iter(query) if isinstance(query, (list, tuple)) else None
        paths = iter(paths)
        while chunk := [str(p) for p in islice(paths, window)]:
            asked = [next(queries) for _ in chunk] if queries is not None else [query] * len(chunk)
            results: list[ImageResult | None] = [None] * len(chunk)
            loaded: list[tuple[int, Image.Image]] = []
            for i, path in enumerate(chunk):
                try:
                    image, (width, height) = open_image(path, self.processor)
                except ImageError as error:
                    logger.error("%s: %s", path, error)
                    results[i] = ImageResult(path, None, error=str(error), reason=error.reason, query=asked[i],
                                             task=self.task)
                    continue
                loaded.append((i, image))
                results[i] = ImageResult(path, None, width, height, query=asked[i], task=self.task)
            predictions = self.predict([image for _, image in loaded], adapter=adapter,
                                       query=[asked[i] for i, _ in loaded])
            for (i, _), prediction in zip(loaded, predictions):
                results[i].prediction = prediction  # type: ignore[union-attr]
            yield from results  # type: ignore[misc]


def trained_args(adapter_dir: str | Path) -> dict:
    """The fields a run saved beside its model (``bbox_sft_args.json``); empty if there are none."""
    return SavedRun.read(adapter_dir).fields


def read_queries(path: str | Path) -> tuple[list[Path], list[str]]:
    """(image paths, one question each) from a JSON-lines file of ``{"image", "query" or "expression"}``
    (the refer data format reads as it is; image paths relative to the file)."""
    path = Path(path)
    images, queries = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
            image, text = value["image"], value.get("query", value.get("expression"))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{path}:{number}: not a JSON object with \"image\" and \"query\" ({error})") from error
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}:{number}: no query (\"query\" or \"expression\") for {image}")
        images.append(Path(image) if Path(image).is_absolute() else path.parent / image)
        queries.append(text)
    return images, queries


def image_files(folder: str | Path) -> Iterator[Path]:
    """Image files in ``folder`` (by suffix), sorted."""
    return iter(sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))


class CocoResults:
    """Predictions as a COCO results list (``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]``),
    the input of pycocotools' ``loadRes`` and of most detection tooling; ids from the images' own
    instances file (images by file name, categories by name)."""

    def __init__(self, annotation_file: str | Path | None) -> None:
        from collections import Counter

        if annotation_file is None:
            raise ValueError("--format coco needs --coco_annotations: the instances file that gives the ids")
        data = json.loads(Path(annotation_file).read_text())
        self.image_ids = {Path(i["file_name"]).name: i["id"] for i in data["images"]}
        self.category_ids = {c["name"]: c["id"] for c in data["categories"]}
        self.results: list[dict] = []
        self.unknown: Counter = Counter()

    def add(self, result: ImageResult) -> None:
        image_id = self.image_ids.get(Path(result.path).name)
        if image_id is None:
            self.unknown["images not in the annotation file"] += 1
            return
        scores = result.prediction.object_scores or [1.0] * len(result.prediction.objects or [])
        for obj, score in zip(result.prediction.objects or [], scores):
            if obj.label not in self.category_ids:
                self.unknown[f"boxes labelled {obj.label!r} (no such category)"] += 1
                continue
            x0, y0, x1, y1 = (obj.box[0] * result.width, obj.box[1] * result.height,
                              obj.box[2] * result.width, obj.box[3] * result.height)
            self.results.append({"image_id": image_id, "category_id": self.category_ids[obj.label],
                                 "bbox": [round(v, 2) for v in (x0, y0, x1 - x0, y1 - y0)], "score": score})


def merge_adapter(adapter: str | Path, output: str | Path, base: str | None = None) -> Path:
    """Merge ``adapter`` into its base (or ``base``) and save the model and processor in ``output``.

    The merge is computed in fp32 (each weight plus its LoRA update rounded once) and saved in the base's own
    dtype, on any device: a bf16 merge would round the update first and add in bf16."""
    from transformers import AutoConfig

    base = base or adapter_base(adapter)
    if base is None:
        raise ValueError(f"{adapter} holds a full model, not an adapter: nothing to merge")
    config = AutoConfig.from_pretrained(base)
    if getattr(config, "quantization_config", None):
        raise ValueError(
            f"base model {base} is quantized: merging LoRA weights into 4/8-bit weights loses the adapter's "
            "precision. Merge into the unquantized base instead (--base <full-precision model>)."
        )
    model, processor = load_for_inference(adapter, base, dtype=torch.float32)
    merged = model.merge_and_unload()
    saved_as = config.dtype if isinstance(config.dtype, torch.dtype) else torch.float32
    merged.to(saved_as).save_pretrained(str(output))
    processor.save_pretrained(str(output))
    for name in ("bbox_sft_args.json", "box_confidence.json"):  # what eval, predict and serving read
        if (Path(adapter) / name).is_file():
            shutil.copy(Path(adapter) / name, Path(output) / name)
    logger.info("merged %s into %s: %s", adapter, base, output)
    return Path(output)
