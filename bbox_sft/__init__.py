"""bbox-sft: fine-tune Qwen3-VL with LoRA to answer with the JSON box of an image's main subject."""

__version__ = "0.1.0"
