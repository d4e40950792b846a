"""The collator: loss on exactly the answer tokens, image tokens intact, same labels as TRL's."""

from __future__ import annotations

import copy
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoProcessor
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from bbox_sft.collator import IGNORE_INDEX, BoxSFTCollator
from bbox_sft.model import set_pixel_budget


@pytest.fixture(scope="module")
def processor(tiny_model_dir: Path):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    set_pixel_budget(processor, 128, 224)
    return processor


@pytest.fixture(scope="module")
def records(box_dataset_dir: Path) -> list[dict]:
    train = datasets.load_from_disk(str(box_dataset_dir))["train"]
    return [train[i] for i in range(5)]


def _answers(records: list[dict]) -> list[str]:
    return [r["completion"][0]["content"][0]["text"] for r in records]


def test_only_the_answer_and_im_end_are_trained(processor, records) -> None:
    batch = BoxSFTCollator(processor)(copy.deepcopy(records))
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) > 1, "the batch should mix lengths to exercise padding"
    for row, answer in zip(batch["labels"], _answers(records)):
        kept = row[row != IGNORE_INDEX]
        assert processor.tokenizer.decode(kept) == answer + "<|im_end|>"
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_image_tokens_match_the_image_grid(processor, records) -> None:
    batch = BoxSFTCollator(processor)(copy.deepcopy(records))
    merge = processor.image_processor.merge_size
    pads = (batch["input_ids"] == processor.image_token_id).sum(1)
    expected = batch["image_grid_thw"].prod(1) // merge**2
    assert pads.tolist() == expected.tolist()
    assert batch["pixel_values"].shape[0] == int(batch["image_grid_thw"].prod(1).sum())


def test_labels_equal_trls_but_for_the_newline_after_im_end(processor, records) -> None:
    ours = BoxSFTCollator(processor)(copy.deepcopy(records))
    trl = DataCollatorForVisionLanguageModeling(processor, completion_only_loss=True)(copy.deepcopy(records))
    assert torch.equal(ours["input_ids"], trl["input_ids"])
    assert torch.equal(ours["pixel_values"], trl["pixel_values"])
    differs = ours["labels"] != trl["labels"]
    assert (ours["labels"][differs] == IGNORE_INDEX).all()
    newline = processor.tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert trl["labels"][differs].tolist() == newline * len(records)  # one trailing "\n" per row


def test_an_answer_missing_from_the_row_raises_clearly(processor, records) -> None:
    class Broken(BoxSFTCollator):
        def render(self, example):
            return super().render(example).replace(example["completion"][0]["content"][0]["text"], "{}")

    with pytest.raises(ValueError, match="answer tokens of example 0 were not found"):
        Broken(processor)(copy.deepcopy(records[:1]))
