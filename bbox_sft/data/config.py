"""What every dataset builder is told: the task its records teach, the answer format, the split sizes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import datasets

from ..formats import ANSWER_FORMATS
from ..tasks import TASKS, get_task


@dataclass
class BoxesConfig(datasets.BuilderConfig):
    """The options all builders share; ``source`` is the data layout a builder reads (a task must take it)."""

    source: ClassVar[str]
    task: str = "subject"
    answer_format: str = "json"
    train_size: int = 2000
    val_size: int = 500
    test_size: int = 500
    seed: int = 42
    num_proc: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        takes = [name for name, kind in TASKS.items() if self.source in kind.sources]
        if self.source not in get_task(self.task).sources:
            raise ValueError(f"{self.source} data gives the {' or '.join(takes)} task, not {self.task!r}")
        if self.answer_format not in ANSWER_FORMATS:
            raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {self.answer_format!r}")
