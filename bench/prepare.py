"""Builder throughput: masks/s of a full ``prepare`` (check, box, write) with 1 and 2 processes.

    python bench/prepare.py [--n 1000]

Target: >= 200 masks/s per core. Images are DUTS-like (256-416 x 192-320 px JPEG + PNG mask).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets  # noqa: E402

from bbox_sft.data import PrepareArguments, prepare_dataset, write_synthetic_set  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic_set(tmp, n=args.n, seed=0)
        rates = {}
        for num_proc in (1, 2):
            start = time.perf_counter()
            prepare_dataset(PrepareArguments(
                data_dir=tmp, output_dir=str(Path(tmp) / f"out{num_proc}"),
                train_size=args.n, val_size=args.n // 10, test_size=args.n // 10, num_proc=num_proc,
            ))
            seconds = time.perf_counter() - start
            rates[num_proc] = args.n / seconds
            print(f"num_proc={num_proc}: {args.n} masks in {seconds:.2f} s = {rates[num_proc]:.0f} masks/s "
                  f"({rates[num_proc] / num_proc:.0f} per process)")
    print(f"speed-up 2 vs 1 process: {rates[2] / rates[1]:.2f}x on {os.cpu_count()} cores; "
          f"target >= 200 masks/s per core: {'met' if rates[1] >= 200 else 'NOT met'}")


if __name__ == "__main__":
    main()
