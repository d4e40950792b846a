"""``phrase``: the objects of the category a prompt names, as a list (``[]`` when there is none)."""

from __future__ import annotations

import numpy as np

from ..boxes import Box
from ..formats import LabelledBox
from . import register
from .base import Example, ListTask, Prior

INSTRUCTION = "Find every {label} and output JSON bounding boxes."


def _hash_unit(text: str, seed: int) -> float:
    from ..data.splits import hash_unit

    return hash_unit(text, seed)


@register
class PhraseTask(ListTask):
    name = "phrase"
    title = "Phrase"
    does = "Finds the objects of the category a prompt names and answers with a JSON list of their boxes"
    heading = ("# The objects you name\nType a category; the fine-tuned model answers with a JSON list of its "
               "boxes (red), `[]` when there is none.")
    sources = ("detection",)
    takes_query = True
    query_label = "Category to find"
    example_query = "cat"

    def instruction(self, query=None) -> str:
        return INSTRUCTION.format(label=query)

    def examples(self, image_id, annotation, categories, absent_per_image=1, seed=42) -> list[Example]:
        """One record per category present, plus ``absent_per_image`` categories it does not hold
        (answer ``[]``), chosen by a stable hash, so the model learns to say none."""
        present = sorted({o.label for o in annotation.objects})
        absent = sorted((c for c in categories if c not in present),
                        key=lambda c: _hash_unit(f"{image_id}:{c}", seed))[:absent_per_image]
        return [Example(f"{image_id}:{label}", label, [o for o in annotation.objects if o.label == label])
                for label in sorted(present + absent)]

    def dataset_answer(self, config: dict) -> str:
        """What a record's answer lists, for the dataset card."""
        return (f"the objects of the category the prompt names; {config['absent_per_image']} absent category per "
                "image asked too (answer `[]`)")

    def allowed_labels(self, labels, query):
        """A phrase answer names only what was asked."""
        return [query] if query else super().allowed_labels(labels, query)

    def grammar_key(self, query):
        return query

    def prior(self, dataset, split) -> Prior:
        """One box, the mean box of the asked category."""
        _, labels, boxes, mean_box, where = self._train_boxes(dataset, split)
        if mean_box is None:
            return self._empty_prior(where)
        per_label = {label: Box(*np.asarray([b for lab, b in zip(labels, boxes) if lab == label]).mean(0).tolist())
                     for label in set(labels)}
        said = f"one box per question: the mean box of the asked category in {where}"
        return Prior(lambda record: [LabelledBox(record["query"], per_label.get(record["query"], mean_box))],
                     said, {"prior": said})
