"""Shared fixtures: everything is built locally; nothing may reach the Hub."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from bbox_sft.data.synthetic import write_synthetic_set  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 60-image synthetic saliency set in the DUTS-TR layout."""
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_set(root, n=60, seed=1)
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen3-VL + processor, saved with save_pretrained (loaded like a Hub model)."""
    from bbox_sft.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-qwen3-vl", hidden_size=128, layers=2)


@pytest.fixture(scope="session")
def box_dataset_dir(synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic set prepared by the builder (40 / 10 / 10)."""
    from bbox_sft.data import PrepareArguments, prepare_dataset

    out = tmp_path_factory.mktemp("prepared") / "boxes"
    prepare_dataset(PrepareArguments(data_dir=str(synthetic_dir), output_dir=str(out),
                                     train_size=40, val_size=10, test_size=10))
    return out


@pytest.fixture(scope="session")
def processor(tiny_model_dir: Path):
    """The tiny model's processor at the demo's pixel budget (128²..160² px); read-only in tests."""
    from transformers import AutoProcessor

    from bbox_sft.model import set_pixel_budget

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    set_pixel_budget(processor, 128, 160)
    return processor
