"""Peak memory of ``bbox-sft label`` on a folder of large photos and on one ten times larger, side by side.

    python bench/label_memory.py [--small 50] [--large 500] [--formats coco hf] [--model DIR]

The photos of ``bench/predict_memory.py`` (12, 16 and 24 MP JPEGs, cached under data/bench_photos); each run
in its own process, its peak RSS read at the end: labelling streams (a window of images at a time, each
answer appended to labels.jsonl) and the export is written from that file one image at a time, so the peak
should not grow with the folder. Prints peak RSS, peak anonymous memory (RSS less the pages of mapped files the
process has read, which the kernel reclaims) and images/s per format and folder, and the ratio of the large
folder's peak to the small one's for each (target <= 1.2). Without --model a tiny random Qwen3-VL is built (the
pixel budget of recipes/qwen3vl_lora.yaml).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from predict_memory import tiny_model, write_photos  # noqa: E402


class AnonymousPeak:
    """The peak of the process's anonymous memory (``RssAnon``, Linux), sampled every 20 ms: RSS also counts the
    pages of files it has memory-mapped and read (``datasets`` maps its Arrow files), which the kernel reclaims."""

    def __init__(self) -> None:
        self.peak_kb = 0
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while True:
            try:
                with open("/proc/self/status") as f:
                    kb = next((int(line.split()[1]) for line in f if line.startswith("RssAnon:")), 0)
            except OSError:
                return
            self.peak_kb = max(self.peak_kb, kb)
            time.sleep(0.02)


def child(model: str, folder: str, n: int, layout: str, out: str) -> None:
    """One measured run of ``label`` over the first ``n`` photos; a JSON line with its seconds, peak RSS and peak
    anonymous memory."""
    from bbox_sft.labelling import LabelArguments, label_folder

    anonymous = AnonymousPeak()

    source = Path(out) / "photos"
    source.mkdir(parents=True)
    for path in sorted(Path(folder).glob("*.jpg"))[:n]:
        os.symlink(path, source / path.name)
    start = time.perf_counter()
    report = label_folder(LabelArguments(adapter=model, dir=str(source), output=str(Path(out) / "export"),
                                         format=layout, images="link"))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_mb": peak / 1024, "anonymous_mb": anonymous.peak_kb / 1024,
                      "labelled": report["labelled"]}))


def run(model: str, folder: Path, n: int, layout: str) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, __file__, "--child", "--model", model, "--folder", str(folder), "--n", str(n),
               "--format", layout, "--out", out]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=50)
    parser.add_argument("--large", type=int, default=500)
    parser.add_argument("--formats", nargs="+", default=["coco", "hf"])
    parser.add_argument("--model", help="adapter or model folder (default: a tiny random Qwen3-VL)")
    parser.add_argument("--photos", default=str(REPO / "data" / "bench_photos"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--format", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.model, args.folder, args.n, args.format, args.out)

    write_photos(Path(args.photos), args.large)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or tiny_model(Path(tmp))
        print(f"{'format':>6} | images | peak RSS (MB) | peak anonymous (MB) | images/s")
        for layout in args.formats:
            small, large = (run(model, Path(args.photos), n, layout) for n in (args.small, args.large))
            for n, r in ((args.small, small), (args.large, large)):
                print(f"{layout:>6} | {n:6d} | {r['peak_mb']:13.0f} | {r['anonymous_mb']:19.0f} | "
                      f"{n / r['seconds']:8.1f}")
            for key, name in (("peak_mb", "RSS"), ("anonymous_mb", "anonymous")):
                growth = large[key] / small[key]
                print(f"{layout:>6}: {name}({args.large}) / {name}({args.small}) = {growth:.2f} (target <= 1.2: "
                      f"{'met' if growth <= 1.2 else 'NOT met'})")


if __name__ == "__main__":
    main()
