"""The record schema: the columns every prepared dataset holds, one set per kind of answer.

Both dataset builders (saliency masks, detection annotations) and the referring-expression reader
write these, and each task (:mod:`bbox_sft.tasks`) reads its truth from them.
"""

from __future__ import annotations

from typing import Any

import datasets

MESSAGES = [
    {
        "role": datasets.Value("string"),
        "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}],
    }
]
_IMAGE = {
    "image": datasets.Image(),
    "image_id": datasets.Value("string"),
    "width": datasets.Value("int32"),
    "height": datasets.Value("int32"),
}
BOX = datasets.List(datasets.Value("float32"), length=4)

# subject: one box per image (no task column: the first schema, kept as it was)
BOX_FEATURES = datasets.Features({**_IMAGE, "box": BOX, "prompt": MESSAGES, "completion": MESSAGES})
# objects, phrase: labelled boxes; ``query`` is the category a phrase record asks for ("" for objects)
OBJECT_FEATURES = datasets.Features({
    **_IMAGE, "task": datasets.Value("string"), "query": datasets.Value("string"),
    "labels": datasets.List(datasets.Value("string")), "boxes": datasets.List(BOX),
    "prompt": MESSAGES, "completion": MESSAGES,
})
# refer: one box per expression; ``query`` is the expression
QUERY_BOX_FEATURES = datasets.Features({
    **_IMAGE, "task": datasets.Value("string"), "query": datasets.Value("string"), "box": BOX,
    "prompt": MESSAGES, "completion": MESSAGES,
})
DEFAULT_TASK = "subject"  # records without a task column


def records_task(dataset: datasets.Dataset | dict[str, Any]) -> str | None:
    """The task a split's (or one record's) records teach: their ``task`` column, subject for the first
    schema, None for an empty split that has a task column (nothing to tell by)."""
    if isinstance(dataset, dict):
        return dataset.get("task") or DEFAULT_TASK
    if "task" not in dataset.column_names:
        return DEFAULT_TASK
    return dataset[0]["task"] if len(dataset) else None
