"""What a task is: the question, the records it builds, its answer, grammar, metrics, prior and pictures.

The pipeline (builders, collator, trainer, evaluation, prediction, app, cards) asks the task and never
branches on its name. Two kinds of answer share most of that:

- :class:`BoxTask`: one box (``subject``, ``refer``), scored by IoU, with a calibrated confidence;
- :class:`ListTask`: a list of labelled boxes (``objects``, ``phrase``), scored by detection metrics.

A new task is one module with one subclass, registered with :func:`bbox_sft.tasks.register`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, ClassVar

import datasets
import numpy as np
from PIL import Image

from ..boxes import Box, iou
from ..chat import completion_messages, prompt_messages
from ..detection import DETECTION_METRIC_NAMES, detection_metrics, list_reward
from ..formats import AnswerFormat, LabelledBox, get_format, parse_answer, parse_native_grounding, parse_objects
from ..grammar import TokenGrammar
from ..grammar.lists import MAX_OBJECTS
from ..grammar.spec import GrammarSpec
from ..metrics import METRIC_NAMES, box_metrics
from ..records import BOX_FEATURES, OBJECT_FEATURES
from ..visualize import GREEN, RED, draw_boxes, draw_objects

Prediction = Any  # bbox_sft.decoding.Prediction (tasks sit below decoding: not imported here)
Answer = Box | list[LabelledBox] | None


@dataclass(frozen=True)
class Annotation:
    """What a data source knows of one image, for a task to turn into records.

    ``main``: the main subject's box (saliency masks); ``objects``: labelled boxes (detection
    annotations, or mask components labelled ``object``); ``expressions``: (text, box) pairs.
    """

    objects: tuple[LabelledBox, ...] = ()
    main: Box | None = None
    expressions: tuple[tuple[str, Box], ...] = ()


@dataclass(frozen=True)
class Example:
    """One record to write: its key, the query it asks ("" for none) and the target its answer states."""

    key: str
    query: str
    target: Any


@dataclass(frozen=True)
class Prior:
    """A model-free answer per record, what it is (for the report), and the report fields it adds."""

    answer: Callable[[dict[str, Any]], Answer]
    description: str
    report: dict[str, Any] = field(default_factory=dict)


def rounded(value: float | None) -> float | None:
    """A probability, spread or score as written in JSON lines: 4 decimals, None kept."""
    return None if value is None else round(value, 4)


class Task:
    """One kind of question the model is fine-tuned to answer. Subclasses fill in the class attributes."""

    name: ClassVar[str]
    title: ClassVar[str]  # a few words, for reports and page titles
    does: ClassVar[str]  # what a model of this task does, for its card
    heading: ClassVar[str]  # the app's heading (markdown)
    sources: ClassVar[tuple[str, ...]]  # data layouts the task is built from, in order of preference
    features: ClassVar[datasets.Features]
    answers_list: ClassVar[bool]
    max_new_tokens: ClassVar[int]
    metric_names: ClassVar[tuple[str, ...]]
    metric_for_best_model: ClassVar[str]
    takes_query: ClassVar[bool] = False
    query_label: ClassVar[str] = ""  # what a query is, for the app's text box and messages
    example_query: ClassVar[str | None] = None
    native_row: ClassVar[str | None] = None  # the eval row of the base model asked in Qwen-VL's own words
    prior_row: ClassVar[str] = "prior"
    calibrates: ClassVar[bool] = False  # whether the answer carries a calibrated confidence

    # --- the question ----------------------------------------------------------------------------

    def instruction(self, query: str | None = None) -> str:
        """The user turn's text for ``query`` (None for tasks that take none)."""
        raise NotImplementedError

    def native_instruction(self, query: str | None = None) -> str | None:
        """The question in Qwen-VL's own words (the zero-shot baseline), or None where it has none."""
        return None

    def check_query(self, query: str | None) -> None:
        """Refuse a missing query where one is needed, and one where none is taken."""
        if self.takes_query and not (query or "").strip():
            raise ValueError(f"a {self.name} model needs a query ({self.query_label.lower()})")
        if not self.takes_query and query is not None:
            raise ValueError(f"a {self.name} model takes no query")

    # --- records ---------------------------------------------------------------------------------

    def examples(self, image_id: str, annotation: Annotation, categories: Sequence[str],
                 absent_per_image: int = 1, seed: int = 42) -> list[Example]:
        """The records one annotated image gives."""
        raise NotImplementedError

    def record(self, query: str, target: Any, answer_format: str | AnswerFormat) -> dict[str, Any]:
        """A record's task columns, prompt and completion (the image columns come from the builder)."""
        raise NotImplementedError

    def target(self, record: dict[str, Any]) -> Any:
        """The truth a record holds, as the answer states it."""
        raise NotImplementedError

    def answer_text(self, target: Any, answer_format: str | AnswerFormat) -> str:
        """The exact answer text for ``target``."""
        raise NotImplementedError

    def query(self, record: dict[str, Any]) -> str | None:
        """The query a record asks (None for tasks that take none)."""
        return (record.get("query") or None) if self.takes_query else None

    def labels(self, dataset: datasets.Dataset) -> list[str] | None:
        """The labels a dataset's answers may hold (what a list grammar allows); None for box answers."""
        return None

    def check_dataset(self, dataset: datasets.Dataset, name: str) -> None:
        """Refuse a split whose records teach another task (a recipe or adapter pointed at the wrong data)."""
        from ..records import records_task

        found = records_task(dataset)
        if found is not None and found != self.name:
            raise ValueError(f"task is {self.name!r} but {name} holds {found!r} records: set task: {found} "
                             f"(or point at a {self.name} dataset)")

    # --- answers ---------------------------------------------------------------------------------

    def parse(self, text: str) -> Answer:
        """The answer in model output, or None; never raises."""
        raise NotImplementedError

    def grammar_spec(self, answer_format: str | AnswerFormat, labels: Sequence[str] | None = None,
                     query: str | None = None, max_objects: int | None = None) -> GrammarSpec | None:
        """The answer's grammar named by plain values (None: this answer cannot be constrained): what a
        vLLM server is sent to build the same automaton (:mod:`bbox_sft.grammar.vllm_processor`)."""
        raise NotImplementedError

    def grammar(self, tokenizer, answer_format: str | AnswerFormat, labels: Sequence[str] | None = None,
                query: str | None = None, max_objects: int | None = None) -> TokenGrammar | None:
        """The constrained-decoding automaton for an answer (None: this answer cannot be constrained)."""
        spec = self.grammar_spec(answer_format, labels, query, max_objects)
        return spec.build(tokenizer) if spec is not None else None

    def max_objects(self, dataset: datasets.Dataset) -> int | None:
        """The most boxes one answer of ``dataset`` holds (the list grammar's bound); None for one-box tasks."""
        return None

    def token_budget(self, grammar: TokenGrammar | None) -> int:
        """``max_new_tokens`` for answers of this task written under ``grammar`` (or unconstrained: None)."""
        return self.max_new_tokens

    def grammar_key(self, query: str | None) -> str | None:
        """Questions with the same key share one grammar, so they can share a batch."""
        return None

    def answer(self, prediction: Prediction) -> Answer:
        raise NotImplementedError

    def score(self, answers: Sequence[Answer], truths: Sequence[Any],
              scores: Sequence[Sequence[float] | None] | None = None) -> dict[str, float]:
        """The task's metrics (:attr:`metric_names`) of answers against truths."""
        raise NotImplementedError

    def scores(self, prediction: Prediction) -> list[float] | None:
        """Per-box scores a ranking metric uses (None: not ranked)."""
        return None

    def reward(self, answers: Sequence[Answer], truths: Sequence[Any], bonus: float = 0.0) -> list[float]:
        """Per answer, what reinforcement learning (GRPO) maximises: the task's own measure of it against the truth,
        continuous; ``bonus`` is added for a hit (IoU >= 0.5). No format term: answers sampled under the grammar
        always parse."""
        raise NotImplementedError

    def prior(self, dataset: datasets.DatasetDict, split: str) -> Prior:
        """A model-free answer per record, from the train split (the evaluated split if there is none)."""
        raise NotImplementedError

    # --- what people see -------------------------------------------------------------------------

    def truth_json(self, record: dict[str, Any]) -> Any:
        raise NotImplementedError

    def answer_json(self, prediction: Prediction, prefix: str = "", confidence: bool = True) -> dict[str, Any]:
        """An evaluation line's fields for one answer (``prefix``: ``base_``, ``native_``)."""
        raise NotImplementedError

    def result_json(self, prediction: Prediction, width: int, height: int, query: str | None) -> dict[str, Any]:
        """A ``bbox-sft predict`` line's fields after ``image`` (boxes normalised and in pixels)."""
        raise NotImplementedError

    def draw(self, image: Image.Image, truth: Any, answer: Answer, caption: str | None = None) -> Image.Image:
        """``image`` with the truth (green, when known) and the answer (red) drawn."""
        raise NotImplementedError

    def caption(self, record: dict[str, Any], prediction: Prediction) -> str | None:
        """The caption of a record's tile in a grid of predictions."""
        return self.query(record)

    def preview_caption(self, record: dict[str, Any]) -> str:
        """The caption of a record's tile in a dataset's preview grid."""
        return self.query(record) or record["image_id"][-12:]

    def __repr__(self) -> str:
        return f"<task {self.name}>"


def _listed(objects: Sequence[LabelledBox] | None, scores: Sequence[float] | None = None
            ) -> list[dict[str, Any]] | None:
    if objects is None:
        return None
    listed = [{"label": o.label, "box": list(o.box)} for o in objects]
    for item, score in zip(listed, scores or []):
        item["score"] = rounded(score)
    return listed


def _named(box: Sequence[float]) -> dict[str, float]:
    return dict(zip(("x_min", "y_min", "x_max", "y_max"), box))


class BoxTask(Task):
    """Tasks answered with one box: scored by IoU, with a confidence calibrated on the validation split."""

    features = BOX_FEATURES
    answers_list = False
    max_new_tokens = 64
    metric_names = METRIC_NAMES
    prior_row = "center prior"
    calibrates = True

    def record(self, query: str, target: Box, answer_format: str | AnswerFormat) -> dict[str, Any]:
        return {"box": list(target), "prompt": prompt_messages(self.instruction(query or None)),
                "completion": completion_messages(self.answer_text(target, answer_format))}

    def target(self, record: dict[str, Any]) -> Box:
        return Box(*record["box"])

    def answer_text(self, target: Sequence[float], answer_format: str | AnswerFormat) -> str:
        return get_format(answer_format).box_text(target)

    def parse(self, text: str) -> Box | None:
        return parse_answer(text)

    def parse_native(self, text: str, pick: str = "first") -> Box | None:
        return parse_native_grounding(text, pick)  # type: ignore[arg-type]

    def grammar_spec(self, answer_format, labels=None, query=None, max_objects=None) -> GrammarSpec:
        return GrammarSpec(get_format(answer_format).name)

    def answer(self, prediction: Prediction) -> Box | None:
        return prediction.box

    def score(self, answers, truths, scores=None) -> dict[str, float]:
        return box_metrics(answers, truths)

    def reward(self, answers, truths, bonus=0.0) -> list[float]:
        """The answer's IoU with the true box (0 when it did not parse), plus ``bonus`` at IoU >= 0.5."""
        ious = [iou(a, t) for a, t in zip(answers, truths)]
        return [o + (bonus if o >= 0.5 else 0.0) for o in ious]

    def prior(self, dataset: datasets.DatasetDict, split: str) -> Prior:
        """The mean training box, or the evaluated split's own mean when there is no train split."""
        if "train" in dataset and len(dataset["train"]):
            source, said = dataset["train"], "mean box of the train split"
        else:
            source = dataset[split]
            said = f"mean box of the evaluated split {split!r} itself: the dataset has no train split"
        box = Box(*np.asarray(source["box"], dtype=float).mean(0).tolist())
        return Prior(lambda record: box, said, {"center_prior_box": list(box), "center_prior_source": said})

    def truth_json(self, record: dict[str, Any]) -> Any:
        return record["box"]

    def answer_json(self, prediction, prefix="", confidence=True) -> dict[str, Any]:
        fields = {f"{prefix}box": prediction.box, f"{prefix}raw": prediction.raw}
        if confidence:
            fields.update(confidence=rounded(prediction.confidence), spread=rounded(prediction.spread))
        return fields

    def result_json(self, prediction, width, height, query) -> dict[str, Any]:
        box = prediction.box
        line = {"query": query} if query is not None else {}
        return {**line, "box": _named(box) if box else None,
                "box_px": list(box.to_pixels(width, height)) if box else None,
                "confidence": rounded(prediction.confidence), "spread": rounded(prediction.spread),
                "raw": prediction.raw}

    def draw(self, image, truth, answer, caption=None) -> Image.Image:
        return draw_boxes(image, [(truth, GREEN), (answer, RED)], caption=caption)

    def caption(self, record, prediction) -> str | None:
        confidence = f"{prediction.confidence:.2f}" if prediction.confidence is not None else None
        return " ".join(filter(None, (self.query(record), confidence))) or None


class ListTask(Task):
    """Tasks answered with a list of labelled boxes: scored by detection metrics (F1@0.5, mAP)."""

    features = OBJECT_FEATURES
    answers_list = True
    max_new_tokens = 640  # unconstrained, labels unknown: room for a long list
    metric_names = DETECTION_METRIC_NAMES
    metric_for_best_model = "eval_f1@0.5"

    def record(self, query: str, target: Sequence[LabelledBox], answer_format) -> dict[str, Any]:
        return {"task": self.name, "query": query, "labels": [o.label for o in target],
                "boxes": [list(o.box) for o in target], "prompt": prompt_messages(self.instruction(query or None)),
                "completion": completion_messages(self.answer_text(target, answer_format))}

    def target(self, record: dict[str, Any]) -> list[LabelledBox]:
        return [LabelledBox(label, Box(*box)) for label, box in zip(record["labels"], record["boxes"])]

    def answer_text(self, target: Sequence[LabelledBox], answer_format) -> str:
        return get_format(answer_format).objects_text(target)

    def labels(self, dataset: datasets.Dataset) -> list[str]:
        queries = [q for q in dataset["query"] if q]
        return sorted({label for labels in dataset["labels"] for label in labels} | set(queries))

    def parse(self, text: str) -> list[LabelledBox] | None:
        return parse_objects(text)

    def allowed_labels(self, labels: Sequence[str] | None, query: str | None) -> list[str] | None:
        """The labels an answer may name (None: unknown, so the answer cannot be constrained)."""
        return list(labels) if labels is not None else None

    def grammar_spec(self, answer_format, labels=None, query=None, max_objects=None) -> GrammarSpec | None:
        allowed = self.allowed_labels(labels, query)
        if allowed is None:
            return None
        return GrammarSpec(get_format(answer_format).name, tuple(sorted(set(allowed))), max_objects or MAX_OBJECTS)

    def max_objects(self, dataset: datasets.Dataset) -> int:
        """The longest answer's count (at least 1): lists are bounded by what training showed, nothing fixed."""
        return max((len(labels) for labels in dataset["labels"]), default=0) or 1

    def token_budget(self, grammar: TokenGrammar | None) -> int:
        """The grammar's longest answer (so no answer it allows is ever cut), else the unconstrained default."""
        return grammar.max_tokens if grammar is not None else self.max_new_tokens

    def answer(self, prediction: Prediction) -> list[LabelledBox] | None:
        return prediction.objects

    def scores(self, prediction: Prediction) -> list[float] | None:
        return prediction.object_scores

    def score(self, answers, truths, scores=None) -> dict[str, float]:
        return detection_metrics(answers, truths, scores)

    def reward(self, answers, truths, bonus=0.0) -> list[float]:
        """Each answer's one-to-one matching with the truth (:func:`~bbox_sft.detection.list_reward`)."""
        return [list_reward(a, t, bonus) for a, t in zip(answers, truths)]

    def truth_json(self, record: dict[str, Any]) -> Any:
        return _listed(self.target(record))

    def answer_json(self, prediction, prefix="", confidence=True) -> dict[str, Any]:
        return {f"{prefix}objects": _listed(prediction.objects, prediction.object_scores),
                f"{prefix}raw": prediction.raw}

    def result_json(self, prediction, width, height, query) -> dict[str, Any]:
        objects = prediction.objects
        line: dict[str, Any] = {"width": width, "height": height}
        if query is not None:
            line["query"] = query
        scores = prediction.object_scores or [None] * len(objects or [])
        line["objects"] = None if objects is None else [
            {"label": o.label, "box": _named(o.box), "box_px": list(o.box.to_pixels(width, height)),
             "score": rounded(score)} for o, score in zip(objects, scores)]
        line["qwen"] = None if objects is None else get_format("qwen").objects_text(objects)  # sv.Detections.from_vlm
        line["raw"] = prediction.raw
        return line

    def draw(self, image, truth, answer, caption=None) -> Image.Image:
        return draw_objects(image, truth or [], answer or [], caption=caption)

    def caption(self, record, prediction) -> str | None:
        return record.get("query") or None

    def preview_caption(self, record) -> str:
        return (f"{record['query']}: " if record["query"] else "") + ", ".join(record["labels"])[:40]

    @staticmethod
    def _train_boxes(dataset: datasets.DatasetDict, split: str
                     ) -> tuple[datasets.Dataset, list[str], list[list[float]], Box | None, str]:
        """(the prior's source split, its labels and boxes, their mean box or None without boxes, where from):
        the train split, or the evaluated split if there is none."""
        source = dataset["train"] if "train" in dataset and len(dataset["train"]) else dataset[split]
        where = "the train split" if source is not dataset[split] else f"the evaluated split {split!r} (no train split)"
        labels, boxes = list(chain.from_iterable(source["labels"])), list(chain.from_iterable(source["boxes"]))
        mean = Box(*np.asarray(boxes, dtype=float).mean(0).tolist()) if boxes else None
        return source, labels, boxes, mean, where

    @staticmethod
    def _empty_prior(where: str) -> Prior:
        said = f"no boxes in {where}: the prior answers []"
        return Prior(lambda record: [], said, {"prior": said})
