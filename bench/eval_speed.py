"""Generation speed on validation images: naive per-image vs batched vs constrained vs fast-forward.

    python bench/eval_speed.py [--model DIR] [--images 64] [--batch_size 16]

(a) naive: one ``generate`` per image, the full JSON written freely;
(b) batched: left-padded batches, KV cache;
(c) batched + constrained decoding through ``generate`` (one decode step per token);
(d) batched + constrained with the forced tokens fast-forwarded (one pass per choice step);
(e), (f): (c) and (d) in the qwen format.
Prints images/s of each, the ratios (c)/(a) (target >= 5x) and (d)/(c) (target >= 2.5x, with
identical boxes on every image), (f)/(e) (never slower), and whether (a), (b) and (c) give the same
boxes where the model is sure (spread <= --sure). Without --model, the tiny recipe is trained
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

from bbox_sft.decoding import ForcedTokenDecoder, generate_answers  # noqa: E402
from bbox_sft.predict import load_for_inference, trained_answer_format  # noqa: E402

supports = ForcedTokenDecoder.supports


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
    parser.add_argument("--sure", type=float, default=0.02, help="spread at or below which a box counts as sure")
    args = parser.parse_args()
    datasets.disable_progress_bars()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or trained_tiny(tmp, args.train_steps)
        model, processor = load_for_inference(model_dir)
        split = datasets.load_from_disk(args.dataset)["validation"]
        images = list(split.select(range(min(args.images, len(split))))["image"])
        answer_format = trained_answer_format(model_dir)
        other = "qwen" if answer_format == "json" else "json"
        constrained = dict(batch_size=args.batch_size, constrained=True)
        runs = {
            "(a) naive per-image": dict(batch_size=1, constrained=False),
            "(b) batched": dict(batch_size=args.batch_size, constrained=False),
            "(c) batched + constrained": dict(constrained, generate=True),
            "(d) constrained, fast-forward": constrained,
            f"(e) (c) in {other} format": dict(constrained, generate=True, answer_format=other),
            f"(f) (d) in {other} format": dict(constrained, answer_format=other),
        }
        results, speed = {}, {}
        for name, kwargs in runs.items():
            kwargs = {"answer_format": answer_format, **kwargs}
            via_generate = kwargs.pop("generate", False)
            ForcedTokenDecoder.supports = classmethod(lambda cls, m: False) if via_generate else supports
            start = time.perf_counter()
            results[name] = generate_answers(model, processor, images, progress=False, **kwargs)
            speed[name] = len(images) / (time.perf_counter() - start)
            ForcedTokenDecoder.supports = supports
            parsed = sum(p.box is not None for p in results[name]) / len(images)
            print(f"{name:>31}: {speed[name]:7.1f} images/s, parse rate {parsed:.2f}")
    a, b, c, d, e, f = (results[n] for n in runs)
    names = list(runs)
    ff = speed[names[3]] / speed[names[2]]
    same = sum(x.raw == y.raw for x, y in zip(c, d))
    print(f"(d) vs (c): {ff:.1f}x images/s (target >= 2.5x: {'met' if ff >= 2.5 else 'NOT met'}), "
          f"identical answers on {same}/{len(images)} images")
    qf = speed[names[5]] / speed[names[4]]
    print(f"(f) vs (e), {other} format: {qf:.1f}x images/s ({'not slower' if qf >= 1 else 'SLOWER'}), "
          f"identical answers on {sum(x.raw == y.raw for x, y in zip(e, f))}/{len(images)} images")
    sure = [i for i, p in enumerate(c) if p.spread is not None and p.spread <= args.sure and a[i].box is not None]
    same_ac = sum(a[i].box == c[i].box for i in sure)
    same_bc = sum(b[i].box == c[i].box for i in sure)
    ratio = speed["(c) batched + constrained"] / speed["(a) naive per-image"]
    print(f"(c) vs (a): {ratio:.1f}x images/s (target >= 5x: {'met' if ratio >= 5 else 'NOT met'})")
    print(f"all {len(images)} images: (a) = (c) on {sum(x.box == y.box for x, y in zip(a, c))}, "
          f"(b) = (c) on {sum(x.box == y.box for x, y in zip(b, c))}")
    print(f"where the model is sure (spread <= {args.sure}, {len(sure)} of {len(images)} images): "
          f"(a) = (c) on {same_ac}, (b) = (c) on {same_bc}")


if __name__ == "__main__":
    main()
