"""Loading Qwen3-VL and its processor for training and inference, the same code for the 2B and the tiny model.

Device and precision follow the hardware: CUDA trains in bf16 (fp16 where bf16 is missing),
Apple MPS in fp32 with eager attention (bf16 and some SDPA/Conv3D paths have failed there),
CPU in fp32. The image processor's pixel budget is the main cost lever: it is set on
``image_processor.size`` because ``max_pixels`` passed to ``from_pretrained`` is ignored by the
Qwen2/3-VL image processors.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from peft import LoraConfig
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel, ProcessorMixin

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


def detect_device() -> DeviceSetup:
    """CUDA bf16 (or fp16), MPS fp32 with eager attention, else CPU fp32."""
    if torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return DeviceSetup("cuda", dtype, "sdpa")
    if torch.backends.mps.is_available():
        return DeviceSetup("mps", torch.float32, "eager")
    return DeviceSetup("cpu", torch.float32, "sdpa")


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


def quantization_config(load_in_4bit: bool, dtype: torch.dtype, device: str, double_quant: bool = True):
    """bitsandbytes nf4 config for QLoRA; refused off CUDA with the reason."""
    if not load_in_4bit:
        return None
    if device != "cuda":
        raise ValueError(
            f"QLoRA (load_in_4bit) needs a CUDA GPU; this machine runs on {device}. "
            "Use plain LoRA (set load_in_4bit: false), which fits a 2B model on CPU and Apple silicon."
        )
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as error:
        raise ValueError("QLoRA needs bitsandbytes: pip install 'bbox-sft[qlora]'") from error
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=dtype,
    )


def load_model(
    model_name_or_path: str,
    setup: DeviceSetup | None = None,
    load_in_4bit: bool = False,
    attn_implementation: str | None = None,
    revision: str | None = None,
) -> PreTrainedModel:
    """Qwen3-VL (any ``AutoModelForImageTextToText``) from a Hub id or a local folder."""
    setup = setup or detect_device()
    quant = quantization_config(load_in_4bit, setup.dtype, setup.device)
    model = AutoModelForImageTextToText.from_pretrained(
        model_name_or_path,
        revision=revision,
        dtype=setup.dtype,
        attn_implementation=attn_implementation or setup.attn_implementation,
        quantization_config=quant,
        device_map={"": torch.cuda.current_device()} if quant is not None else None,
    )
    return model


def set_trainable(model: PreTrainedModel, train_vision_tower: bool, train_merger: bool) -> None:
    """For full fine-tuning: freeze the vision tower and/or the merger (projector) as asked."""
    visual = model.model.visual
    for name, parameter in visual.named_parameters():
        is_merger = "merger" in name
        parameter.requires_grad = train_merger if is_merger else train_vision_tower


def lora_config(
    r: int,
    alpha: int,
    dropout: float,
    target_modules: list[str] | str | None = None,
    train_vision_tower: bool = False,
    train_merger: bool = False,
    use_rslora: bool = False,
    use_dora: bool = False,
) -> LoraConfig:
    """LoRA on the language model's linear layers; optionally the vision blocks; merger fully trained if asked."""
    if target_modules is None:
        target_modules = LANGUAGE_LORA_TARGETS
        if train_vision_tower:
            target_modules = f"({LANGUAGE_LORA_TARGETS})|({VISION_LORA_TARGETS})"
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        modules_to_save=MERGER_MODULES if train_merger else None,
        bias="none",
        task_type="CAUSAL_LM",
        use_rslora=use_rslora,
        use_dora=use_dora,
    )


def describe_trainable(model: torch.nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)"

