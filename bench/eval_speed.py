"""Generation speed on validation images: naive per-image vs batched vs batched + constrained.

    python bench/eval_speed.py [--model DIR] [--images 64] [--batch_size 16]

(a) naive: one ``generate`` per image, the full JSON written freely;
(b) batched: left-padded batches, KV cache;
(c) batched + constrained decoding.
Prints images/s of each, the ratio (c)/(a) (target >= 5x), and whether the three give the same
boxes where the model is sure (confidence >= --sure). Without --model, the tiny recipe is trained
briefly first so the model has something to be sure about.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]

import datasets  # noqa: E402
import torch  # noqa: E402

from bbox_sft.decoding import generate_answers  # noqa: E402
from bbox_sft.predict import load_for_inference  # noqa: E402


def trained_tiny(tmp: str, steps: int) -> Path:
    from bbox_sft.train import main, parse_args

    os.chdir(REPO)
    out = Path(tmp) / "tiny"
    main(*parse_args([str(REPO / "recipes/tiny_cpu.yaml"), "--max_steps", str(steps), "--output_dir", str(out),
                      "--save_strategy", "no", "--disable_tqdm", "true", "--log_level", "error"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="trained adapter or model folder (default: train the tiny recipe briefly)")
    parser.add_argument("--dataset", default=str(REPO / "data/tiny_cpu"))
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--train_steps", type=int, default=150)
    parser.add_argument("--sure", type=float, default=0.5)
    args = parser.parse_args()
    datasets.disable_progress_bars()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or trained_tiny(tmp, args.train_steps)
        model, processor = load_for_inference(model_dir)
        split = datasets.load_from_disk(args.dataset)["validation"]
        images = list(split.select(range(min(args.images, len(split))))["image"])
        runs = {
            "(a) naive per-image": dict(batch_size=1, constrained=False),
            "(b) batched": dict(batch_size=args.batch_size, constrained=False),
            "(c) batched + constrained": dict(batch_size=args.batch_size, constrained=True),
        }
        results, speed = {}, {}
        for name, kwargs in runs.items():
            start = time.perf_counter()
            results[name] = generate_answers(model, processor, images, progress=False, **kwargs)
            speed[name] = len(images) / (time.perf_counter() - start)
            parsed = sum(p.box is not None for p in results[name]) / len(images)
            print(f"{name:>27}: {speed[name]:7.1f} images/s, parse rate {parsed:.2f}")
    a, b, c = (results[n] for n in runs)
    sure = [i for i, p in enumerate(c) if p.confidence >= args.sure and a[i].box is not None]
    same_ac = sum(a[i].box == c[i].box for i in sure)
    same_bc = sum(b[i].box == c[i].box for i in sure)
    ratio = speed["(c) batched + constrained"] / speed["(a) naive per-image"]
    print(f"(c) vs (a): {ratio:.1f}x images/s (target >= 5x: {'met' if ratio >= 5 else 'NOT met'})")
    print(f"all {len(images)} images: (a) = (c) on {sum(x.box == y.box for x, y in zip(a, c))}, "
          f"(b) = (c) on {sum(x.box == y.box for x, y in zip(b, c))}")
    print(f"where the model is sure (confidence >= {args.sure}, {len(sure)} of {len(images)} images): "
          f"(a) = (c) on {same_ac}, (b) = (c) on {same_bc}")


if __name__ == "__main__":
    main()
