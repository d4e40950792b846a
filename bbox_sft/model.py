"""Loading Qwen3-VL and its processor for training and inference, the same code for the 2B and the tiny model.

Device and precision follow the hardware and what the run was told: a run told to stay on the CPU
(``accelerate launch --cpu``, ``use_cpu`` in an accelerate config or the recipe: accelerate's
``ACCELERATE_USE_CPU``) runs there in fp32 whatever GPU is visible, as transformers runs it; otherwise
CUDA computes in bf16 where the GPU has it natively (fp16 on older GPUs such as a T4, which would only
emulate bf16), Apple MPS in fp32 with eager attention (bf16 and some SDPA/Conv3D paths have failed there),
CPU in fp32. Weights that train in full stay fp32 (mixed precision computes in half), a frozen LoRA base
loads in the device's half precision. The image processor's pixel budget is the main cost lever: it is
set on ``image_processor.size`` because ``max_pixels`` passed to ``from_pretrained`` is ignored by the
Qwen2/3-VL image processors.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from accelerate import PartialState
from peft import LoraConfig
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel, ProcessorMixin
from trl import ModelConfig

logger = logging.getLogger(__name__)

# The language model's linear layers; peft's "all-linear" would also wrap the vision tower.
LANGUAGE_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
VISION_LORA_TARGETS = r".*visual\.blocks.*\.(qkv|proj|linear_fc1|linear_fc2)"
MERGER_MODULES = ["merger"]


@dataclass(frozen=True)
class DeviceSetup:
    """Where the model runs and in which precision; derived, not configured."""

    device: str
    dtype: torch.dtype
    attn_implementation: str | None

    @property
    def bf16(self) -> bool:
        return self.dtype == torch.bfloat16

    @property
    def fp16(self) -> bool:
        return self.dtype == torch.float16


def told_cpu() -> bool:
    """Whether this process was told to stay on the CPU: accelerate's switch, ``ACCELERATE_USE_CPU``, which
    ``accelerate launch --cpu`` and ``use_cpu: true`` in an accelerate config set (transformers obeys it too)."""
    from accelerate.utils import parse_flag_from_env

    return parse_flag_from_env("ACCELERATE_USE_CPU")


def detect_device(cpu: bool = False) -> DeviceSetup:
    """Where this run computes: the CPU in fp32 when told so (``cpu``, e.g. the recipe's ``use_cpu``, or
    :func:`told_cpu`); else CUDA in bf16 where the GPU has it natively, fp16 where it would only emulate it;
    MPS fp32 with eager attention; else CPU fp32."""
    if cpu or told_cpu():
        return DeviceSetup("cpu", torch.float32, "sdpa")
    if torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        return DeviceSetup("cuda", dtype, "sdpa")
    if torch.backends.mps.is_available():
        return DeviceSetup("mps", torch.float32, "eager")
    return DeviceSetup("cpu", torch.float32, "sdpa")


def weights_dtype(setup: DeviceSetup, trains_in_full: bool) -> torch.dtype:
    """The dtype weights load in: fp32 where they train in full (AdamW's updates are below bf16's resolution;
    mixed precision computes in half, as TRL's own default does), the device's own where they stay frozen
    under LoRA (and as QLoRA's compute dtype)."""
    return torch.float32 if trains_in_full else setup.dtype


def resolve_dtype(model_args: ModelConfig, setup: DeviceSetup) -> torch.dtype | str:
    """The weights' dtype: the recipe's ``dtype`` where set ("auto": the checkpoint's), else derived
    (:func:`weights_dtype`: fp32 where they train in full, the device's half under LoRA); written back to
    ``model_args`` so the logged arguments say it."""
    if model_args.dtype is None:
        model_args.dtype = str(weights_dtype(setup, trains_in_full=not model_args.use_peft)).removeprefix("torch.")
    return model_args.dtype if model_args.dtype == "auto" else getattr(torch, model_args.dtype)


def set_pixel_budget(processor: ProcessorMixin, min_side: int, max_side: int) -> int:
    """Resize images to between ``min_side``² and ``max_side``² pixels; return visual tokens at most.

    ``size`` holds pixel counts under the names shortest_edge/longest_edge (min/max pixels).
    """
    image_processor = processor.image_processor
    image_processor.size = {"shortest_edge": min_side * min_side, "longest_edge": max_side * max_side}
    grid = image_processor.patch_size * image_processor.merge_size
    return (max_side * max_side) // (grid * grid)


def visual_tokens(processor: ProcessorMixin, width: int, height: int) -> int:
    """Visual tokens the processor makes for an image of this size (after its resize)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    ip = processor.image_processor
    grid = ip.patch_size * ip.merge_size
    h, w = smart_resize(height, width, factor=grid, min_pixels=ip.size["shortest_edge"],
                        max_pixels=ip.size["longest_edge"])
    return (h // grid) * (w // grid)


def load_processor(model_name_or_path: str, min_side: int | None = None, max_side: int | None = None,
                   revision: str | None = None) -> ProcessorMixin:
    """The model's processor (Hub id or local folder) with the pixel budget applied."""
    processor = AutoProcessor.from_pretrained(model_name_or_path, revision=revision)
    if not hasattr(processor, "image_processor"):
        raise RuntimeError(
            f"{model_name_or_path}: AutoProcessor returned a bare {type(processor).__name__}. Qwen3-VL's "
            "processor needs torchvision: install it with the torch build you use."
        )
    if min_side and max_side:
        most = set_pixel_budget(processor, min_side, max_side)
        logger.info("pixel budget %d²..%d² px: at most %d visual tokens per image", min_side, max_side, most)
    return processor


# What a QLoRA (or 8-bit) run quantizes: the language model's linear layers, where nearly all the weights are. The
# vision tower with its merger and the output head stay in the compute dtype: 4-bit merger weights could not train
# in full (train_merger: peft would ask a packed uint8 weight for gradients), and the vision tower is a sixth of
# the 2B's weights. Patterns as transformers matches them: from the start of a module's full name.
QUANTIZATION_SKIPS = ["model.visual", "lm_head"]


def quantization_config(model_args: ModelConfig):
    """TRL's ``get_quantization_config`` (4-bit type, nested quantization, storage; or 8-bit; compute dtype =
    ``model_args.dtype``) with :data:`QUANTIZATION_SKIPS` left unquantized; None without quantization."""
    from trl import get_quantization_config

    config = get_quantization_config(model_args)
    if config is not None:
        config.llm_int8_skip_modules = list(QUANTIZATION_SKIPS)  # bitsandbytes' skip list, 4-bit included
    return config


# ModelConfig fields that only mean something with LoRA (use_peft) or with 4-bit loading.
LORA_FIELDS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_target_parameters",
               "lora_modules_to_save", "lora_task_type", "use_rslora", "use_dora")
FOUR_BIT_FIELDS = ("bnb_4bit_quant_type", "use_bnb_nested_quant", "bnb_4bit_quant_storage")


def changed_from_default(model_args: ModelConfig, name: str) -> bool:
    default = next(f for f in fields(ModelConfig) if f.name == name).default
    return getattr(model_args, name) != default


def check_model_args(model_args: ModelConfig, setup: DeviceSetup, train_vision_tower: bool = False) -> None:
    """Refuse, naming the field and why, every ``ModelConfig`` setting that cannot take effect here.

    Runs before anything is loaded or written, so a recipe never trains with a setting silently dropped.
    """
    quantized = next((f for f in ("load_in_4bit", "load_in_8bit") if getattr(model_args, f)), None)
    if quantized:
        if setup.device != "cuda":
            raise ValueError(
                f"{quantized} (QLoRA) needs a CUDA GPU for bitsandbytes; this machine runs on {setup.device}. Use "
                f"plain LoRA ({quantized}: false), which fits a 2B model on CPU and Apple silicon."
            )
        if not model_args.use_peft:
            raise ValueError(f"{quantized} needs use_peft: true: quantized weights cannot be fine-tuned fully")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as error:
            raise ValueError(f"{quantized} needs bitsandbytes: pip install 'bbox-sft[qlora]'") from error
    if not model_args.load_in_4bit:
        for name in FOUR_BIT_FIELDS:
            if changed_from_default(model_args, name):
                raise ValueError(f"{name} is set, but load_in_4bit is false: it would change nothing")
    if not model_args.use_peft:
        for name in LORA_FIELDS:
            if changed_from_default(model_args, name):
                raise ValueError(f"{name} is set, but use_peft is false: LoRA fields apply to LoRA training only")
    if model_args.use_peft and model_args.lora_target_parameters and model_args.lora_dropout:
        raise ValueError(f"lora_target_parameters needs lora_dropout: 0 (peft cannot apply dropout to LoRA on "
                         f"parameters); lora_dropout is {model_args.lora_dropout}")
    if model_args.lora_task_type != "CAUSAL_LM":
        raise ValueError(f"lora_task_type {model_args.lora_task_type!r}: the model generates its answer, which "
                         "only CAUSAL_LM adapters do")
    if model_args.use_peft and train_vision_tower and model_args.lora_target_modules is not None:
        raise ValueError("train_vision_tower adds the vision blocks to the default LoRA targets; with "
                         "lora_target_modules set, name the vision modules there yourself (and leave "
                         "train_vision_tower false)")
    if changed_from_default(model_args, "model_revision") and Path(model_args.model_name_or_path or "").exists():
        raise ValueError(f"model_revision {model_args.model_revision!r} applies to Hub ids, but "
                         f"{model_args.model_name_or_path} is a local folder")


def load_model(
    model_name_or_path: str,
    setup: DeviceSetup | None = None,
    quantization=None,
    attn_implementation: str | None = None,
    revision: str | None = None,
    dtype: torch.dtype | str | None = None,
) -> PreTrainedModel:
    """Qwen3-VL (any ``AutoModelForImageTextToText``) from a Hub id or a local folder.

    A quantized model is placed on this process's GPU (``{"": local rank}``, as TRL's scripts do).
    """
    setup = setup or detect_device()
    return AutoModelForImageTextToText.from_pretrained(
        model_name_or_path,
        revision=revision,
        dtype=dtype or setup.dtype,
        attn_implementation=attn_implementation or setup.attn_implementation,
        quantization_config=quantization,
        device_map={"": PartialState().local_process_index} if quantization is not None else None,
    )


# Model families whose pretrained grounding format is ``{"bbox_2d": [...]}`` on a 0-1000 grid.
QWEN_GRID_FAMILIES = ("qwen3_vl", "qwen3_vl_moe")
QWEN_PIXEL_FAMILIES = ("qwen2_5_vl",)  # bbox_2d in absolute pixels of the resized image


def check_answer_format(model_name_or_path: str, answer_format: str, revision: str | None = None) -> None:
    """The qwen answer format is Qwen3-VL's 0-1000 grid: refused on Qwen2.5-VL (pixels), warned about elsewhere."""
    if answer_format != "qwen":
        return
    from transformers import AutoConfig

    family = AutoConfig.from_pretrained(model_name_or_path, revision=revision).model_type
    if family in QWEN_PIXEL_FAMILIES:
        raise ValueError(f"answer_format 'qwen' writes bbox_2d on Qwen3-VL's 0-1000 grid, but {model_name_or_path} "
                         f"is {family}, which grounds in absolute pixels: use answer_format json")
    if family not in QWEN_GRID_FAMILIES:
        logger.warning("answer_format 'qwen' is Qwen3-VL's 0-1000 grounding format; %s is %s, which was not "
                       "pretrained on it (json may learn faster)", model_name_or_path, family)


def set_trainable(model: PreTrainedModel, train_vision_tower: bool, train_merger: bool) -> None:
    """For full fine-tuning: freeze the vision tower and/or the merger (projector) as asked."""
    visual = model.model.visual
    for name, parameter in visual.named_parameters():
        is_merger = "merger" in name
        parameter.requires_grad = train_merger if is_merger else train_vision_tower


def lora_config(model_args: ModelConfig, train_vision_tower: bool = False, train_merger: bool = False) -> LoraConfig:
    """TRL's ``get_peft_config`` (every LoRA field of ``ModelConfig``) with our defaults layered on top.

    Without ``lora_target_modules`` LoRA goes on the language model's linear layers (and the vision
    blocks with ``train_vision_tower``), not peft's ``all-linear``; ``train_merger`` adds the merger
    to ``lora_modules_to_save``.
    """
    from trl import get_peft_config

    config = get_peft_config(model_args)
    targets = model_args.lora_target_modules
    if isinstance(targets, str) and targets != "all-linear" and re.fullmatch(r"[\w.]+", targets):
        # TRL turns a one-name list into that name, which peft reads as a regex over full module paths
        config.target_modules = {targets}
    if targets is None:
        config.target_modules = LANGUAGE_LORA_TARGETS
        if train_vision_tower:
            config.target_modules = f"({LANGUAGE_LORA_TARGETS})|({VISION_LORA_TARGETS})"
    if train_merger:
        config.modules_to_save = sorted({*(config.modules_to_save or []), *MERGER_MODULES})
    return config


def describe_trainable(model: torch.nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)"

