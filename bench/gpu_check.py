"""What only a CUDA GPU can show, in one offline run of a few minutes: the figures for the README's GPU lines.

    python bench/gpu_check.py [--device cuda] [--images 64] [--skip_tests]

1. The suite's device-sensitive tests on this machine as ``make test`` runs them (conftest.py hides the GPU, so
   their figures are the CPU's): the device policy, decoding, eval/predict/merge, the recipe fields.
2. The Qwen3-VL-2B architecture with random weights (nothing downloaded): one LoRA step at the recipe's batch
   (``recipes/qwen3vl_lora.yaml``: 8 images of 448² px, bf16, activation checkpointing): seconds per step and
   peak GPU memory.
3. Constrained decoding of that model in bf16 on the same images: ``BoxPredictor``'s fast-forward decoder
   (choices scored in fp32) against transformers' ``generate`` with the grammar as a logits processor
   (choices on bf16 logits, ties to the lowest id) and against fast-forward deciding on the bf16 logits: images/s,
   answers equal, and how many choices had their two best options tied in bf16.

Needs torch, transformers, peft, accelerate, trl and datasets (and pytest for 1). ``--device cpu`` runs parts 2
and 3 on the CPU in bf16 (slowly; the README's CPU figures for the tiny model come from ``--tiny``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

TESTS = ["tests/test_device_policy.py", "tests/test_decoding.py", "tests/test_inference.py",
         "tests/test_recipe_fields.py"]


def suite() -> dict:
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS], cwd=REPO,
                         capture_output=True, text=True)
    last = (run.stdout.strip().splitlines() or ["(no output)"])[-1]
    print(f"== the suite's device-sensitive tests ({', '.join(TESTS)}): {last}")
    return {"returncode": run.returncode, "summary": last, "seconds": round(time.perf_counter() - start)}


def model_2b(device: str):
    """Qwen3-VL-2B's architecture with random weights in bf16, and a processor with the real image settings."""
    from transformers import Qwen3VLForConditionalGeneration

    from bbox_sft.model import set_pixel_budget
    from bbox_sft.tiny import build_processor, qwen3_vl_2b_config

    processor = build_processor()
    set_pixel_budget(processor, 320, 448)
    config = qwen3_vl_2b_config()
    tokenizer = processor.tokenizer
    for key, token in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                       ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")):
        setattr(config, key, tokenizer.convert_tokens_to_ids(token))
    config.text_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(config)
    model = model.to_empty(device=device).to(torch.bfloat16)
    model.tie_weights()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.02)
    return model, processor


def photos(n: int) -> list[Image.Image]:
    from bbox_sft.data.synthetic import make_sample

    rng = np.random.default_rng(0)
    return [Image.fromarray(make_sample(rng)[0]).resize((448, 448)) for _ in range(n)]


def lora_step(device: str, steps: int = 3) -> dict:
    from peft import get_peft_model
    from trl import ModelConfig

    from bbox_sft.collator import BoxSFTCollator
    from bbox_sft.model import lora_config

    model, processor = model_2b(device)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, lora_config(ModelConfig(use_peft=True, lora_r=16, lora_alpha=32,
                                                          lora_dropout=0.05)))
    answer = '{"x_min": 0.13, "y_min": 0.22, "x_max": 0.54, "y_max": 0.78}'
    records = [{"image": image, "prompt": [{"role": "user", "content": [
        {"type": "image", "text": None}, {"type": "text", "text": "Find the main subject and output a JSON "
                                                                  "bounding box."}]}],
                "completion": [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]}
               for image in photos(8)]
    batch = {k: v.to(device) for k, v in BoxSFTCollator(processor)(records).items()}
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    model.train()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    result = {"batch": 8, "tokens": int(batch["input_ids"].shape[1]), "seconds_per_step": round(min(times[1:] or
                                                                                               times), 3),
              "peak_gib": round(peak, 2) if peak is not None else None}
    print(f"== 2B LoRA step, batch 8 at 448² px, bf16, activation checkpointing: {result}")
    del model, optimizer
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def decoding(model, processor, images: list[Image.Image], batch_size: int = 8) -> dict:
    """fast-forward (fp32 choices), fast-forward deciding on the bf16 logits, and generate: answers and images/s."""
    from bbox_sft.decoding import ForcedTokenDecoder, generate_answers

    counts = {"choices": 0, "choices_with_a_bf16_tie_at_the_top": 0}

    def timed() -> tuple[list, float]:
        start = time.perf_counter()
        out = generate_answers(model, processor, images, batch_size=batch_size, progress=False)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        return out, len(images) / (time.perf_counter() - start)

    def on_bf16_logits(self, logits, row, options):
        top = sorted(logits[row, list(options)].tolist(), reverse=True)[:2]
        counts["choices"] += 1
        counts["choices_with_a_bf16_tie_at_the_top"] += top[0] == top[1]
        return logits[row].float()

    fast, fast_speed = timed()
    with mock.patch.object(ForcedTokenDecoder, "scores", on_bf16_logits):
        half, _ = timed()
    with mock.patch.object(ForcedTokenDecoder, "supports", classmethod(lambda cls, m: False)):
        reference, generate_speed = timed()
    return {"images": len(images), "fast_forward_images_per_s": round(fast_speed, 1),
            "generate_images_per_s": round(generate_speed, 1),
            "equal_fp32_choices_vs_generate": sum(a.raw == b.raw for a, b in zip(fast, reference)),
            "equal_bf16_choices_vs_generate": sum(a.raw == b.raw for a, b in zip(half, reference)), **counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--skip_tests", action="store_true")
    parser.add_argument("--skip_2b", action="store_true", help="only the tiny model's decoding (with --tiny)")
    parser.add_argument("--tiny", default=None, help="a trained tiny model folder (the demo's): decoding on it too")
    parser.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args()
    report: dict = {"device": args.device, "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}
    if not args.skip_tests:
        report["suite"] = suite()
    if not args.skip_2b:
        report["lora_step_2b"] = lora_step(args.device)
        model, processor = model_2b(args.device)
        model.eval()
        report["decoding_2b_bf16"] = decoding(model, processor, photos(args.images))
        print(f"== 2B constrained decoding in bf16: {report['decoding_2b_bf16']}")
        del model
    if args.tiny:
        from transformers import AutoModelForImageTextToText

        from bbox_sft.model import load_processor

        tiny = AutoModelForImageTextToText.from_pretrained(args.tiny, dtype=torch.bfloat16).to(args.device)
        report["decoding_tiny_bf16"] = decoding(tiny, load_processor(args.tiny), photos(args.images))
        print(f"== tiny model ({args.tiny}) constrained decoding in bf16: {report['decoding_tiny_bf16']}")
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
