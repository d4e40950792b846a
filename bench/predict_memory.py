"""Peak memory and speed of ``bbox-sft predict --dir`` on folders of large photos.

    python bench/predict_memory.py [--small 50] [--large 500] [--model DIR]

Writes (once, cached under data/bench_photos) JPEGs of 12, 16 and 24 MP with one bright subject,
then runs each path in its own process and reads that process's peak RSS:

(a) the former path: every photo decoded at full resolution and held, then predicted;
(b) streaming (``BoxPredictor.predict_files``): decoded small (JPEG draft) to the processor's size
    and predicted a window of batches at a time.

Prints peak RSS and images/s of (a) on the small folder and (b) on both, then the targets:
RSS of (b) on the large folder <= 1.2x on the small one; (b) >= 3x the images/s of (a) on the
same files; and how many boxes (a) and (b) share. Without --model a tiny random Qwen3-VL is built
(the pixel budget of recipes/qwen3vl_lora.yaml: 320²..448² px).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
SIZES = ((4000, 3000), (4896, 3264), (6000, 4000))  # 12, 16 and 24 MP


def write_photos(folder: Path, n: int) -> list[Path]:
    """``n`` large JPEGs (cached): a smooth background and one bright ellipse, upscaled from a small drawing."""
    import cv2
    import numpy as np
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in tqdm(range(n), desc="Writing photos", unit="photo"):
        path = folder / f"photo_{i:04d}.jpg"
        paths.append(path)
        if path.is_file():
            continue
        rng = np.random.default_rng(i)
        width, height = SIZES[i % len(SIZES)]
        small = np.zeros((height // 16, width // 16, 3), np.uint8)
        small[:] = rng.integers(0, 90, 3)
        centre = (int(rng.integers(40, small.shape[1] - 40)), int(rng.integers(40, small.shape[0] - 40)))
        axes = (int(rng.integers(15, 60)), int(rng.integers(15, 60)))
        cv2.ellipse(small, centre, axes, 0, 0, 360, tuple(int(c) for c in rng.integers(170, 256, 3)), -1)
        photo = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
        cv2.imwrite(str(path), photo, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return paths


def child(mode: str, model: str, folder: str, n: int, batch_size: int) -> None:
    """One measured run; prints a JSON line with its boxes, seconds and peak RSS."""
    from bbox_sft.images import load_image
    from bbox_sft.predict import BoxPredictor, image_files

    predictor = BoxPredictor.from_pretrained(model, batch_size=batch_size)
    paths = list(image_files(folder))[:n]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if mode == "full":
        images = [load_image(p) for p in paths]  # the former path: all decoded in full, then predicted
        boxes = [p.box for p in predictor.predict(images)]
    else:
        boxes = [r.prediction.box for r in predictor.predict_files(paths)]
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"boxes": boxes, "seconds": seconds, "peak_mb": peak / 1024, "before_mb": before / 1024}))


def run(mode: str, model: str, folder: Path, n: int, batch_size: int) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--model", model, "--folder", str(folder),
           "--n", str(n), "--batch_size", str(batch_size)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def tiny_model(folder: Path) -> str:
    """A tiny random Qwen3-VL in ``folder``, its processor at the pixel budget of recipes/qwen3vl_lora.yaml."""
    from transformers import AutoProcessor

    from bbox_sft.model import set_pixel_budget
    from bbox_sft.tiny import save_tiny_model

    model = str(save_tiny_model(folder / "tiny", hidden_size=128, layers=2))
    processor = AutoProcessor.from_pretrained(model)
    set_pixel_budget(processor, 320, 448)
    processor.save_pretrained(model)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=50)
    parser.add_argument("--large", type=int, default=500)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--model", help="adapter or model folder (default: a tiny random Qwen3-VL)")
    parser.add_argument("--photos", default=str(REPO / "data" / "bench_photos"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.model, args.folder, args.n, args.batch_size)

    from bbox_sft.boxes import iou

    write_photos(Path(args.photos), args.large)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or tiny_model(Path(tmp))
        full = run("full", model, Path(args.photos), args.small, args.batch_size)
        small = run("stream", model, Path(args.photos), args.small, args.batch_size)
        large = run("stream", model, Path(args.photos), args.large, args.batch_size)

    rows = [("(a) full decode, all held", args.small, full), ("(b) streaming", args.small, small),
            ("(b) streaming", args.large, large)]
    print(f"{'path':>27} | images | peak RSS (MB) | images/s")
    for name, n, r in rows:
        print(f"{name:>27} | {n:6d} | {r['peak_mb']:13.0f} | {n / r['seconds']:8.1f}")
    growth = large["peak_mb"] / small["peak_mb"]
    speedup = (args.small / small["seconds"]) / (args.small / full["seconds"])
    same = sum(a == b for a, b in zip(full["boxes"], small["boxes"]))
    overlap = [iou(a, b) for a, b in zip(full["boxes"], small["boxes"])]
    print(f"RSS({args.large}) / RSS({args.small}), streaming: {growth:.2f} (target <= 1.2: "
          f"{'met' if growth <= 1.2 else 'NOT met'})")
    print(f"images/s, streaming vs full decode on the same {args.small} photos: {speedup:.1f}x (target >= 3x: "
          f"{'met' if speedup >= 3 else 'NOT met'})")
    print(f"same boxes on {same} of {args.small} photos; mean IoU between the two paths' boxes "
          f"{sum(overlap) / len(overlap):.3f}, lowest {min(overlap):.3f}")


if __name__ == "__main__":
    main()
