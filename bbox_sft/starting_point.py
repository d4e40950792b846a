"""Where a training run starts: a base model, or an earlier run of this package, whose adapter is trained further
(or merged into its base first). SFT continued from an adapter and the GRPO stage after SFT both start here.

``model_name_or_path`` names it either way, as TRL's scripts have it: a Hub id or folder of a model, or of a LoRA
adapter (``adapter_config.json``), whose base is the one it names. A folder this package trained also holds the
run's description (:class:`~bbox_sft.saved_run.SavedRun`: task, answer format, pixel budget), which a later stage
takes its defaults from.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, ProcessorMixin
from trl import ModelConfig

from .model import (
    LORA_FIELDS,
    DeviceSetup,
    changed_from_default,
    check_answer_format,
    load_model,
    load_processor,
    lora_config,
    quantization_config,
    set_trainable,
)
from .predict import adapter_base, resolve_adapter
from .saved_run import ARGS_NAME, SavedRun

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StartingPoint:
    """What ``model_name_or_path`` names: the weights to load (``base``), an adapter on them, the run saved there."""

    name: str
    base: str
    adapter: Path | None = None
    run: SavedRun | None = None

    @classmethod
    def resolve(cls, model_name_or_path: str) -> StartingPoint:
        """A local folder is read as it is; a Hub id is an adapter where it holds ``adapter_config.json`` (fetched,
        small), else a model (loaded by ``from_pretrained`` as usual)."""
        folder = Path(model_name_or_path)
        if not folder.is_dir() and _is_hub_adapter(model_name_or_path):
            folder = resolve_adapter(model_name_or_path)
        if not folder.is_dir():
            return cls(model_name_or_path, model_name_or_path)
        run = SavedRun.read(folder) if (folder / ARGS_NAME).is_file() else None
        base = adapter_base(folder) if (folder / "adapter_config.json").is_file() else None
        if base is None:
            return cls(model_name_or_path, str(folder), run=run)
        return cls(model_name_or_path, base, adapter=folder, run=run)

    def describe(self) -> str:
        if self.adapter is None:
            return f"{self.name}" + (f" (a {self.run.task.name} run, fully fine-tuned)" if self.run else "")
        return f"the adapter {self.name} on {self.base}" + (f" (a {self.run.task.name} run)" if self.run else "")


def _is_hub_adapter(repo: str) -> bool:
    if repo.count("/") != 1 or repo.startswith((".", "/", "~")):
        return False
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(repo, "adapter_config.json")
    except Exception:  # offline, a model repo, no access: a model id, loaded as one
        return False
    return True


def load_starting_point(start: StartingPoint, script_args, model_args: ModelConfig, setup: DeviceSetup,
                        dtype: torch.dtype | str) -> tuple[PreTrainedModel, ProcessorMixin, object | None, str]:
    """(the model to train, its processor with the recipe's pixel budget, the LoRA config for TRL to apply or
    None, how it trains: a phrase for the log, the run description and the model card).

    The processor is the one saved with the adapter where there is one (the SFT run's), the base's otherwise.

    From an adapter, with ``use_peft``: that adapter keeps training (TRL takes a ``PeftModel`` as it is), with its
    own rank and targets, so the recipe's ``lora_*`` fields are refused rather than ignored. With the recipe's
    ``merge_adapter`` (or ``use_peft: false``) it is merged into its base first (in fp32) and a fresh LoRA, or
    full fine-tuning, trains the merged model.
    """
    from peft import PeftModel

    check_answer_format(start.base, script_args.answer_format, model_args.model_revision)
    processor = load_processor(str(start.adapter or start.base), script_args.image_min_side, script_args.image_max_side,
                               revision=None if start.adapter else model_args.model_revision)
    train_vision_tower, train_merger = script_args.train_vision_tower, script_args.train_merger
    continue_adapter = start.adapter is not None and model_args.use_peft and not script_args.merge_adapter
    if continue_adapter:
        changed = [f for f in LORA_FIELDS if changed_from_default(model_args, f)]
        extra = [name for name, on in (("train_vision_tower", train_vision_tower), ("train_merger", train_merger))
                 if on]
        if changed or extra:
            raise ValueError(f"{', '.join(changed + extra)} set, but {start.name} is an adapter that trains further "
                             "with its own modules and rank: set merge_adapter: true to train a fresh LoRA with "
                             "them on the merged model, or leave them out")
    merging = start.adapter is not None and not continue_adapter
    model = load_model(start.base, setup, quantization=None if merging else quantization_config(model_args),
                       attn_implementation=model_args.attn_implementation, revision=model_args.model_revision,
                       dtype=torch.float32 if merging else dtype)
    if continue_adapter:
        model = PeftModel.from_pretrained(model, str(start.adapter), is_trainable=True, torch_device=setup.device)
        config = model.peft_config["default"]
        how = (f"the SFT adapter {start.name} trained further (its own LoRA: r={config.r}, "
               f"alpha={config.lora_alpha})")
        return model, processor, None, how
    if merging:
        if model_args.load_in_4bit or model_args.load_in_8bit:
            raise ValueError("merge_adapter with a quantized base: the merged weights are full precision, so "
                             "quantizing them again would lose the merge; train the adapter further instead")
        model = PeftModel.from_pretrained(model, str(start.adapter)).merge_and_unload()
        model.to(dtype if isinstance(dtype, torch.dtype) else torch.float32)  # "auto": the checkpoint's, fp32
    source = f"{start.base} with the adapter {start.name} merged in" if merging else start.describe()
    if model_args.use_peft:
        return model, processor, lora_config(model_args, train_vision_tower, train_merger), f"a new LoRA on {source}"
    if merging:  # peft froze the base it loaded the adapter on
        model.requires_grad_(True)
    set_trainable(model, train_vision_tower, train_merger)
    return model, processor, None, f"full fine-tuning of {source}"


def run_defaults(start: StartingPoint, script_args) -> None:
    """Fill the fields left unset (None) from the run ``start`` names, else from the SFT defaults; said in the log."""
    defaults = {"task": "subject", "answer_format": "json", "image_min_side": 320, "image_max_side": 448}
    saved = start.run.fields if start.run else {}
    taken = []
    for name, default in defaults.items():
        if getattr(script_args, name) is None:
            value = saved.get(name, default)
            setattr(script_args, name, value)
            taken.append(f"{name}={value}")
    if taken:
        logger.info("from %s: %s", start.name if saved else "the defaults", ", ".join(taken))
