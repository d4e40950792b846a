"""Cards and pushes to the Hugging Face Hub, failing with a clear message (and nothing lost) offline."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .tasks import get_task

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


def counts(d: dict[str, int]) -> str:
    """``{"reason": n}`` as "n reason, ..." (sorted), or "none"."""
    return ", ".join(f"{n} {reason}" for reason, n in sorted(d.items())) or "none"


def objects_dataset_card(report: dict[str, Any]) -> str:
    """README.md for a prepared objects / phrase dataset: source, task, categories, splits, every box accounted for."""
    config = report["config"]
    rows = "\n".join(f"| {split} | {n} | {report['split_records'][split]} |"
                     for split, n in report["split_sizes"].items())
    boxes = "\n".join(f"| {split} | {v['kept']} | {counts(v['lost'])} |"
                      for split, v in report["boxes_by_split"].items())
    task = get_task(report["task"]).dataset_answer(config)
    splits = ("the export's own (" + ", ".join(report["export_splits"]) + "), each cut to its size"
              if report.get("export_splits") else f"by a stable hash of the image id, seed {config['seed']}")
    dropped = counts({f"{name} ({why})": 1 for name, why in report["dropped_categories"].items()}).replace("1 ", "")
    limit = config.get("max_objects")
    return f"""---
task_categories:
- object-detection
- image-text-to-text
tags:
- bounding-box
- bbox-sft
---

# Labelled boxes from a {report["layout"]} detection export ({report["task"]})

Each record holds an image, its labelled boxes (`labels`, `boxes` normalised to [0, 1]) and the
chat turns that TRL's vision SFT reads (`prompt`, `completion`). The answer lists {task}.

- **Source:** {", ".join(f"`{Path(f).name}`" for f in report["annotation_files"].values())}, {report["images_found"]}
  images, {len(report["categories"])} categories: {", ".join(report["categories"])}
- **Categories left out** (no boxes): {dropped}
- **Answer format:** `{config["answer_format"]}`; objects per answer: {"at most " + str(limit) if limit else "all"}
  (the most in one image: {report["most_objects"]["objects"]})
- **Splits:** {splits}

| split | images | records |
|---|---|---|
{rows}

- **Boxes:** {report["boxes"]["kept"]} of {report["boxes"]["found"]} kept

| split | boxes kept | boxes lost, by reason |
|---|---|---|
{boxes}

- **Skipped images:** {counts(report["skipped"])}
- **Fixed:** {counts({**report["fixed"], **report["handled"]})}
"""


def refer_dataset_card(report: dict[str, Any]) -> str:
    """README.md for a prepared refer dataset: source, expressions, splits, what was skipped."""
    config = report["config"]
    rows = "\n".join(f"| {split} | {n} | {report['split_records'][split]} |"
                     for split, n in report["split_sizes"].items())
    return f"""---
task_categories:
- object-detection
- image-text-to-text
tags:
- referring-expression
- bounding-box
- bbox-sft
---

# Referring expressions with boxes

Each record holds an image, one referring expression (`query`), the box it picks out (`box`,
normalised to [0, 1]) and the chat turns that TRL's vision SFT reads (`prompt`, `completion`).

- **Source:** `{report["source"]}`, {report["images_found"]} images, {report["expressions_found"]} expressions
- **Answer format:** `{config["answer_format"]}`
- **Splits** (by a stable hash of the image id, seed {config["seed"]}; every expression of an image in one split):

| split | images | records |
|---|---|---|
{rows}

- **Skipped images:** {counts(report["skipped"])}
- **Skipped expressions:** {counts(report["skipped_expressions"])}
- **Fixed:** {counts({**report["fixed"], **report["handled"]})}
"""


def dataset_card(report: dict[str, Any], citation: str) -> str:
    """README.md for a prepared dataset: where it came from, how boxes were made, split sizes."""
    config = report["config"]
    splits = report["split_sizes"]
    sources = ", ".join(f"{name} ({n} images)" for name, n in report["sources"].items())
    skipped = ", ".join(f"{n} {reason}" for reason, n in report["skipped"].items()) or "none"
    rows = "\n".join(f"| {split} | {n} |" for split, n in splits.items())
    title, what, boxes = get_task(config.get("task", "subject")).mask_card(config)
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

# {title}

Each record holds an image, {what}, and the chat turns that TRL's vision SFT
reads (`prompt`: user turn with the image and the instruction; `completion`: the answer).

- **Source:** {sources}
- **Box definition:** {boxes} Normalised to [0, 1] with pixel edges: the full image is `[0, 0, 1, 1]`.
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


def write_model_card(
    output_dir: str | Path,
    base_model: str | None,
    dataset_name: str | None,
    metrics: dict[str, Any],
    answer_format: str = "json",
    hub_model_id: str | None = None,
    metrics_source: str = "last evaluation",
    test_metrics: dict[str, Any] | None = None,
    task: Any = "subject",
    training: str | None = None,
    tags: tuple[str, ...] = (),
) -> Path:
    """README.md with Hub metadata and a usage snippet that loads the adapter with plain peft; ``training`` says
    how it was trained (a sentence), ``tags`` adds Hub tags (``grpo``)."""
    task = get_task(task)
    output_dir = Path(output_dir)
    is_adapter = (output_dir / "adapter_config.json").is_file()
    repo = hub_model_id or str(output_dir)
    shown = ("loss", *task.metric_names)
    instruction = task.instruction(task.example_query)
    does = task.does
    query = f" --query {json.dumps(task.example_query)}" if task.takes_query else ""
    scores = {k: metrics[f"eval_{k}"] for k in shown if f"eval_{k}" in metrics}
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in scores.items() if isinstance(v, float))
    tests = {k: test_metrics[f"test_{k}"] for k in shown if f"test_{k}" in (test_metrics or {})}
    test_rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in tests.items() if isinstance(v, float))
    test_section = f"""
## Test split (after training)

| metric | value |
|---|---|
{test_rows}
""" if test_rows else ""
    meta = ["---", f"base_model: {base_model}" if base_model else None,
            "library_name: peft" if is_adapter else "library_name: transformers",
            f"datasets:\n- {dataset_name}" if dataset_name and "/" in dataset_name and not Path(dataset_name).exists()
            else None,
            "pipeline_tag: image-text-to-text",
            "tags:\n- bbox-sft\n- bounding-box\n- trl" + ("\n- lora" if is_adapter else "")
            + "".join(f"\n- {tag}" for tag in tags), "---"]
    if is_adapter:
        usage = f'''```python
import torch
from peft import PeftModel
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

base = AutoModelForImageTextToText.from_pretrained("{base_model}", dtype="auto")
model = PeftModel.from_pretrained(base, "{repo}")
processor = AutoProcessor.from_pretrained("{repo}")
messages = [{{"role": "user", "content": [{{"type": "image"}},
             {{"type": "text", "text": {json.dumps(instruction)}}}]}}]
text = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(text=[text], images=[Image.open("photo.jpg")], return_tensors="pt").to(model.device)
out = model.generate(**inputs, max_new_tokens={task.max_new_tokens}, do_sample=False)
print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

Or with this project: `bbox-sft predict --adapter {repo} --image photo.jpg{query}`.'''
    else:
        usage = f"`bbox-sft predict --adapter {repo} --image photo.jpg{query}`"
    card = "\n".join(m for m in meta if m) + f"""

# {Path(repo).name}

{does}
(answer format `{answer_format}`), fine-tuned from `{base_model}` with bbox-sft (TRL + PEFT).
{f"{chr(10)}Training: {training}.{chr(10)}" if training else ""}
## Usage

{usage}

## Validation (generation-based; {metrics_source})

| metric | value |
|---|---|
{rows or "| (no evaluation ran) | |"}
{test_section}"""
    path = output_dir / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(card)
    return path


def push_folder(folder: str | Path, repo_id: str, private: bool = False) -> None:
    """Upload an adapter or model folder as it is on disk (its README.md is the model card)."""
    from huggingface_hub import HfApi

    api = HfApi()

    def push() -> None:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id,
                          ignore_patterns=["checkpoint-*", "*.bin", "validation/*"])

    push_or_explain(push, repo_id, folder)
    logger.info("pushed %s to https://huggingface.co/%s", folder, repo_id)
