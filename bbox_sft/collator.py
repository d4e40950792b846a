"""The vision collator: chat template + images in one processor call, loss on the answer tokens only.

Why not count characters of a text-only prompt: the processor expands each ``<|image_pad|>`` into
``prod(image_grid_thw) / merge²`` tokens, so any offset measured without the image is wrong (a known
way to train on garbage). The answer is located by its tokens in each processed row instead, and
checked against the answer tokenized on its own.

Compared with TRL's ``DataCollatorForVisionLanguageModeling(completion_only_loss=True)`` on the same
prompt/completion records, the labels are identical except for one token: TRL also trains on the
newline the chat template writes after the closing ``<|im_end|>``. Generation stops at
``<|im_end|>``, so that newline is never produced and we leave it out of the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import ProcessorMixin
from trl.data_utils import prepare_multimodal_messages

IGNORE_INDEX = -100


def _answer_text(example: dict[str, Any]) -> str:
    completion = example["completion"]
    if isinstance(completion, str):
        return completion
    content = completion[-1]["content"]
    return content if isinstance(content, str) else "".join(c["text"] for c in content if c.get("text"))


def _images(example: dict[str, Any]) -> list:
    if "images" in example:
        return list(example["images"])
    return [example["image"]]


def _find_last(row: list[int], needle: list[int]) -> int:
    """Start of the last occurrence of ``needle`` in ``row``, or -1."""
    n = len(needle)
    for start in range(len(row) - n, -1, -1):
        if row[start : start + n] == needle:
            return start
    return -1


@dataclass
class BoxSFTCollator:
    """Batches TRL vision prompt/completion records for ``SFTTrainer`` (``data_collator=``).

    Each record needs ``image`` (or ``images``), ``prompt`` and ``completion``. Nothing is truncated
    (``max_length`` is None): cutting image tokens or the answer would corrupt the example.
    """

    processor: ProcessorMixin

    def render(self, example: dict[str, Any]) -> str:
        messages = prepare_multimodal_messages(example["prompt"] + example["completion"], images=_images(example))
        return self.processor.apply_chat_template(messages, tokenize=False)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        tokenizer = self.processor.tokenizer
        texts = [self.render(example) for example in examples]
        batch = self.processor(
            text=texts,
            images=[_images(example) for example in examples],
            padding=True,
            padding_side="right",
            truncation=False,
            return_tensors="pt",
            add_special_tokens=False,
        )
        end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        for i, example in enumerate(examples):
            target = tokenizer(_answer_text(example), add_special_tokens=False)["input_ids"] + [end_id]
            row = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
            start = _find_last(row, target)
            if start < 0:
                rendered = tokenizer.decode(row[-len(target) - 8 :])
                raise ValueError(
                    f"collator: the answer tokens of example {i} were not found in its processed row. "
                    f"Answer {_answer_text(example)!r} tokenizes differently in context; the row ends with "
                    f"{rendered!r}. Check the chat template and the completion format."
                )
            labels[i, start : start + len(target)] = batch["input_ids"][i, start : start + len(target)]
        batch["labels"] = labels
        return batch


def add_lengths(dataset, processor: ProcessorMixin, column: str = "length"):
    """Add each record's processed length (what the collator's row holds) without decoding images.

    The chat-templated text is tokenized with its one image placeholder, which the processor then
    expands to the image's visual tokens (known from its size). With ``train_sampling_strategy:
    group_by_length`` the Trainer batches records of similar length from this column, which keeps
    padding to a few percent.
    """
    from .model import visual_tokens

    render = BoxSFTCollator(processor).render
    texts = [render({"prompt": p, "completion": c, "images": [None]})
             for p, c in zip(dataset["prompt"], dataset["completion"])]
    counts = processor.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []  # empty split
    lengths = [
        len(tokens) - 1 + visual_tokens(processor, w, h)  # the placeholder becomes the visual tokens
        for w, h, tokens in zip(dataset["width"], dataset["height"], counts)
    ]
    if column in dataset.column_names:
        dataset = dataset.remove_columns(column)
    return dataset.add_column(column, lengths)
