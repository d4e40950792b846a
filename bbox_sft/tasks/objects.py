"""``objects``: every object in the image, as a list of labelled boxes (from detection annotations,
or one ``object`` box per saliency-mask component)."""

from __future__ import annotations

from collections import Counter

from ..formats import LabelledBox
from . import register
from .base import Example, ListTask, Prior

INSTRUCTION = "Find every object and output a JSON list of labelled bounding boxes."


@register
class ObjectsTask(ListTask):
    name = "objects"
    title = "Objects"
    does = "Finds every object in an image and answers with a JSON list of labelled boxes"
    heading = "# Every object\nThe fine-tuned model answers with a JSON list of labelled boxes (red)."
    sources = ("detection", "saliency")

    def instruction(self, query=None) -> str:
        return INSTRUCTION

    def dataset_answer(self, config: dict) -> str:
        """What a record's answer lists, for the dataset card."""
        return "every object, as a list in a fixed order (by x_min, then y_min)"

    def mask_card(self, config: dict) -> tuple[str, str, str]:
        """(title, what a record holds, how boxes come from masks) for a saliency dataset's card."""
        return ("Object boxes from saliency masks", "a box per object (labelled `object`)",
                f"mask pixels >= {config['threshold']} are foreground, split into 8-connected components; "
                f"every component of at least {config['min_fraction']} of the largest one's area is an object.")

    def examples(self, image_id, annotation, categories, absent_per_image=1, seed=42) -> list[Example]:
        return [Example(image_id, "", list(annotation.objects))]

    def prior(self, dataset, split) -> Prior:
        """The mean number of objects per image (rounded), each at the mean box, labelled with the most
        frequent labels in turn."""
        source, labels, boxes, mean_box, where = self._train_boxes(dataset, split)
        if mean_box is None:
            return self._empty_prior(where)
        count = round(len(boxes) / len(source))
        common = [label for label, _ in Counter(labels).most_common()]
        guess = [LabelledBox(common[i % len(common)], mean_box) for i in range(count)]
        said = (f"{count} box(es) (the mean count per image) at the mean box, labelled {[o.label for o in guess]} "
                f"(the most frequent labels), from {where}")
        return Prior(lambda record: list(guess), said, {"prior": said})
