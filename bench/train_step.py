"""Training cost: the tiny recipe's speed and padding, and one LoRA step of the real 2B architecture.

    python bench/train_step.py [--skip_2b] [--steps 20]

1. Tiny recipe (recipes/tiny_cpu.yaml): samples/s and the share of padding tokens per batch with
   random batches vs ``group_by_length`` batches, side by side. Target: padding <= 5 %.
2. Qwen3-VL-2B architecture with random weights (no download) at the LoRA recipe's pixel budget:
   parameter count, trainable share under LoRA, time and peak memory (RSS) of one LoRA step on CPU
   in bf16 where the CPU supports it, else fp32. Target: peak <= 12 GiB.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]

import datasets  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import RandomSampler  # noqa: E402
from transformers.trainer_pt_utils import LengthGroupedSampler  # noqa: E402
from trl import ModelConfig  # noqa: E402

from bbox_sft.collator import BoxSFTCollator  # noqa: E402
from bbox_sft.model import describe_trainable, lora_config, set_pixel_budget  # noqa: E402
from bbox_sft.tiny import QWEN3_VL_2B_PARAMETERS, build_processor, qwen3_vl_2b_config  # noqa: E402
from bbox_sft.train import main as train_main  # noqa: E402
from bbox_sft.train import parse_args  # noqa: E402


def padding_share(dataset, collator, sampler, batch_size: int, batches: int = 20) -> float:
    order = list(iter(sampler))
    pad = total = 0
    for b in range(min(batches, len(order) // batch_size)):
        batch = collator([dataset[i] for i in order[b * batch_size : (b + 1) * batch_size]])
        total += batch["attention_mask"].numel()
        pad += int((batch["attention_mask"] == 0).sum())
    return pad / total


def tiny(steps: int) -> None:
    print("== tiny recipe (recipes/tiny_cpu.yaml) ==")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in ("random", "group_by_length"):
            args = parse_args([str(REPO / "recipes/tiny_cpu.yaml"), "--max_steps", str(steps), "--output_dir",
                               f"{tmp}/{strategy}", "--save_strategy", "no", "--train_sampling_strategy", strategy,
                               "--disable_tqdm", "true", "--log_level", "error"])
            os.chdir(REPO)
            trainer = train_main(*args)
            train = trainer.train_dataset
            collator, batch_size = trainer.data_collator, args[1].per_device_train_batch_size
            torch.manual_seed(0)
            sampler = (RandomSampler(train) if strategy == "random"
                       else LengthGroupedSampler(batch_size, lengths=train["length"]))
            share = padding_share(train, collator, sampler, batch_size)
            speed = trainer.state.log_history[-1]["train_samples_per_second"]
            results[strategy] = (speed, share)
            print(f"{strategy:>16}: {speed:6.1f} samples/s, padding {100 * share:4.1f} % of batch tokens")
    (s_r, p_r), (s_g, p_g) = results["random"], results["group_by_length"]
    print(f"group_by_length vs random: {s_g / s_r:.2f}x samples/s, padding {100 * p_g:.1f} % vs {100 * p_r:.1f} % "
          f"(target <= 5 %: {'met' if p_g <= 0.05 else 'NOT met'})")


def two_b() -> None:
    print("== Qwen3-VL-2B architecture, random weights, one LoRA step on CPU ==")
    bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    dtype = torch.bfloat16 if bf16 else torch.float32
    start = time.perf_counter()
    from peft import get_peft_model
    from transformers import Qwen3VLForConditionalGeneration

    processor = build_processor()  # the real processor's image settings, with the small local tokenizer
    set_pixel_budget(processor, 320, 448)
    config = qwen3_vl_2b_config()
    tokenizer = processor.tokenizer
    for key, token in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                       ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")):
        setattr(config, key, tokenizer.convert_tokens_to_ids(token))  # ids inside the 151k vocabulary
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(config)
    model = model.to_empty(device="cpu").to(dtype)
    model.tie_weights()  # to_empty allocates the tied lm_head separately
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.02)
    parameters = model.num_parameters()
    print(f"parameters: {parameters:,} (published {QWEN3_VL_2B_PARAMETERS:,}: "
          f"{'equal' if parameters == QWEN3_VL_2B_PARAMETERS else 'DIFFERENT'}); built in "
          f"{time.perf_counter() - start:.0f} s, dtype {dtype}")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, lora_config(ModelConfig(use_peft=True, lora_r=16, lora_alpha=32, lora_dropout=0.05)))
    print(describe_trainable(model))

    import numpy as np
    from PIL import Image

    from bbox_sft.data.synthetic import make_sample

    image, _ = make_sample(np.random.default_rng(0))
    record = {"image": Image.fromarray(image).resize((448, 448)),
              "prompt": [{"role": "user", "content": [{"type": "image", "text": None},
                                                       {"type": "text", "text": "Find the main subject."}]}],
              "completion": [{"role": "assistant", "content": [{"type": "text", "text":
                              '{"x_min": 0.13, "y_min": 0.22, "x_max": 0.54, "y_max": 0.78}'}]}]}
    batch = BoxSFTCollator(processor)([record])
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    model.train()
    start = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    seconds = time.perf_counter() - start
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    print(f"one LoRA step (batch 1, {batch['input_ids'].shape[1]} tokens, 448² px): {seconds:.1f} s, "
          f"peak RSS {peak_gib:.1f} GiB (target <= 12 GiB: {'met' if peak_gib <= 12 else 'NOT met'})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip_2b", action="store_true")
    parser.add_argument("--only_2b", action="store_true")
    cli = parser.parse_args()
    datasets.disable_progress_bars()
    if not cli.only_2b:
        tiny(cli.steps)
    if not cli.skip_2b:
        two_b()
    sys.stdout.flush()
