"""``refer``: the one object a free-text description picks out (referring expressions, as in RefCOCO).

The prompt quotes the description ("the small blue star at the top"); the answer is one box. Data:
JSON lines of ``{"image", "expression", "bbox": [x, y, w, h]}`` (pixels, as COCO writes boxes), or a
``datasets`` dataset with image, expression and bbox columns (:mod:`bbox_sft.data.refer`).
"""

from __future__ import annotations

from ..chat import completion_messages, prompt_messages
from ..records import QUERY_BOX_FEATURES
from . import register
from .base import BoxTask, Example

INSTRUCTION = 'Locate "{expression}" and output a JSON bounding box.'
# Qwen3-VL's own RefCOCO evaluation prompt: the zero-shot baseline it reports (~86 % Acc@0.5 at 2B).
NATIVE_INSTRUCTION = ('Locate every object that matches the description "{expression}" in the image. '
                      'Report bbox coordinates in JSON format.')


@register
class ReferTask(BoxTask):
    name = "refer"
    title = "Referring expression"
    does = "Finds the object a free-text description picks out and answers with its bounding box"
    heading = ("# The object you describe\nDescribe one object (\"the small blue star at the top\"); the "
               "fine-tuned model answers with its JSON bounding box (red).")
    sources = ("refer",)
    features = QUERY_BOX_FEATURES
    takes_query = True
    query_label = "Description of the object"
    example_query = "the red star"
    metric_for_best_model = "eval_success@0.5"  # Acc@0.5, as RefCOCO results are reported
    native_row = "base, Qwen's RefCOCO prompt"

    def instruction(self, query=None) -> str:
        return INSTRUCTION.format(expression=query)

    def native_instruction(self, query=None) -> str:
        return NATIVE_INSTRUCTION.format(expression=query)

    def examples(self, image_id, annotation, categories, absent_per_image=1, seed=42) -> list[Example]:
        """One record per expression (several per image; splits are drawn by image)."""
        return [Example(f"{image_id}:{i}", text, box) for i, (text, box) in enumerate(annotation.expressions)]

    def record(self, query, target, answer_format):
        return {"task": self.name, "query": query, "box": list(target),
                "prompt": prompt_messages(self.instruction(query)),
                "completion": completion_messages(self.answer_text(target, answer_format))}
