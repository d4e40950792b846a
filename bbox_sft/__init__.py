"""bbox-sft: fine-tune Qwen3-VL with LoRA to answer with JSON boxes: the main subject, every object, the
objects a prompt names, the object a description picks out (:mod:`bbox_sft.tasks`)."""

__version__ = "0.1.0"
