"""Cards and pushes to the Hugging Face Hub, failing with a clear message (and nothing lost) offline."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)


class HubPushError(RuntimeError):
    """A push that did not reach the Hub; what was built locally is untouched."""


def push_or_explain(push: Callable[[], Any], repo_id: str, local_path: str | Path) -> Any:
    """Run ``push``; turn any failure into one message naming the repo, the cause and the local copy."""
    try:
        return push()
    except Exception as error:  # network, auth and offline-mode errors all end here
        raise HubPushError(
            f"Could not push to the Hub repo {repo_id!r}: {type(error).__name__}: {error}\n"
            f"Nothing is lost: the local copy is at {local_path}. Check your network and "
            "`hf auth login`, then push again."
        ) from error


def dataset_card(report: dict[str, Any], citation: str) -> str:
    """README.md for a prepared dataset: where it came from, how boxes were made, split sizes."""
    config = report["config"]
    splits = report["split_sizes"]
    sources = ", ".join(f"{name} ({n} images)" for name, n in report["sources"].items())
    skipped = ", ".join(f"{n} {reason}" for reason, n in report["skipped"].items()) or "none"
    rows = "\n".join(f"| {split} | {n} |" for split, n in splits.items())
    return f"""---
task_categories:
- object-detection
- image-text-to-text
tags:
- saliency
- bounding-box
- bbox-sft
size_categories:
- n<10K
---

# Main-subject boxes from saliency masks

Each record holds an image, the box of its main subject, and the chat turns that TRL's vision SFT
reads (`prompt`: user turn with the image and the instruction; `completion`: the answer).

- **Source:** {sources}
- **Box definition:** mask pixels >= {config["threshold"]} are foreground, split into 8-connected
  components; box mode `{config["box_mode"]}` (`largest`: the largest component;
  `union`: all foreground; `components`: all components of at least {config["min_fraction"]} of the
  largest one's area). Normalised to [0, 1] with pixel edges: the full image is `[0, 0, 1, 1]`.
- **Answer format:** `{config["answer_format"]}`
- **Splits** (by a stable hash of the image id, seed {config["seed"]}):

| split | images |
|---|---|
{rows}

- **Skipped while building:** {skipped}

## Citation

```bibtex
{citation}
```

The images and masks keep the terms of their original dataset.
"""
