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
