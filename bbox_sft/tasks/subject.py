"""``subject``: the main subject of the image, as one box (from saliency masks such as DUTS)."""

from __future__ import annotations

from . import register
from .base import BoxTask, Example

INSTRUCTION = "Find the main subject and output a JSON bounding box."
# Qwen-VL's own grounding request, in the words of its cookbooks ("Locate the top right brown cake,
# output its bbox coordinates using JSON format."): the base model's zero-shot baseline.
NATIVE_INSTRUCTION = "Locate the main subject of the image, output its bbox coordinates using JSON format."


@register
class SubjectTask(BoxTask):
    name = "subject"
    title = "Main subject"
    does = "Finds the main subject of an image and answers with its bounding box"
    heading = ("# Where is the main subject?\nThe fine-tuned model answers with a JSON bounding box (red). "
               "Confidence: the estimated probability that the box overlaps the true one with IoU ≥ 0.5, "
               "calibrated when the adapter was trained.")
    sources = ("saliency",)
    metric_for_best_model = "eval_mean_iou"
    native_row = "base, native grounding prompt"

    def instruction(self, query=None) -> str:
        return INSTRUCTION

    def native_instruction(self, query=None) -> str:
        return NATIVE_INSTRUCTION

    def mask_card(self, config: dict) -> tuple[str, str, str]:
        """(title, what a record holds, how boxes come from masks) for a saliency dataset's card."""
        return ("Main-subject boxes from saliency masks", "the box of its main subject",
                f"mask pixels >= {config['threshold']} are foreground, split into 8-connected\n  components; "
                f"box mode `{config['box_mode']}` (`largest`: the largest component;\n  `union`: all foreground; "
                f"`components`: all components of at least {config['min_fraction']} of the\n  largest one's area).")

    def examples(self, image_id, annotation, categories, absent_per_image=1, seed=42) -> list[Example]:
        return [Example(image_id, "", annotation.main)] if annotation.main is not None else []
