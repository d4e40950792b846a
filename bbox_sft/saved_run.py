"""What a run trained, saved beside its model as ``bbox_sft_args.json``: the one reader and writer.

Train writes it; eval, predict, the app and serving read it, so the task, answer format, labels and
pixel budget a model was trained with are known from one place (not from the data it is pointed at).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

from .formats import AnswerFormat, get_format
from .tasks import Task, get_task

ARGS_NAME = "bbox_sft_args.json"


@dataclass
class SavedRun:
    """The run description: the recipe's own fields as trained, plus the labels its answers may hold."""

    task: Task
    answer_format: AnswerFormat
    labels: list[str] | None = None
    max_objects: int | None = None  # list tasks: the most objects of a training answer (the grammar's bound)
    image_min_side: int | None = None
    image_max_side: int | None = None
    quantization: dict[str, Any] | None = None  # the base's bitsandbytes config when trained quantized (QLoRA)
    fields: dict[str, Any] = field(default_factory=dict)  # every field as saved

    @classmethod
    def read(cls, folder: str | Path) -> SavedRun:
        """The description saved in ``folder``; a folder without one reads as a subject run in json."""
        path = Path(folder) / ARGS_NAME
        saved = json.loads(path.read_text()) if path.is_file() else {}
        return cls(task=get_task(saved.get("task", "subject")), answer_format=get_format(saved.get("answer_format",
                                                                                                    "json")),
                   labels=saved.get("labels"), max_objects=saved.get("max_objects"),
                   image_min_side=saved.get("image_min_side"), image_max_side=saved.get("image_max_side"),
                   quantization=saved.get("quantization"), fields=saved)

    @staticmethod
    def write(folder: str | Path, script_args: Any, labels: list[str] | None, max_objects: int | None = None,
              max_new_tokens: int | None = None, quantization: dict[str, Any] | None = None,
              extra: dict[str, Any] | None = None) -> Path:
        """Save the recipe's fields (a dataclass), the labels and the list bound (with the token budget it
        gives, for a reader) beside the model, the base's quantization where it trained quantized, and ``extra``
        (how it was trained: the trainer, where it started)."""
        fields = asdict(script_args) if is_dataclass(script_args) else dict(script_args)
        path = Path(folder) / ARGS_NAME
        saved = {**fields, "labels": labels, "max_objects": max_objects, "max_new_tokens": max_new_tokens,
                 "quantization": quantization, **(extra or {})}
        path.write_text(json.dumps(saved, indent=2, default=str))
        return path
