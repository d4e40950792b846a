"""Images/s of the vLLM server against BoxPredictor (fast-forward) and ``generate``, same images, one run.

    python bench/serve_speed.py [--adapter DIR] [--images 192] [--vllm_python .venv-vllm/bin/python]

(a) BoxPredictor, constrained, forced runs fast-forwarded (batches of 8);
(b) the same grammar through transformers' ``generate`` (one decode step per token, batches of 8);
(c) ``bbox-sft serve`` (vLLM, grammar as its logits processor) asked by ``ServerPredictor``, 8 in flight;
(d) the server writing as many tokens as (c) without the grammar, and (e) one token only (what a request
costs before decoding: HTTP, vLLM's image processing, the prefill), both 8 in flight;
then the server's latency per request, p50 / p95, with 1 client and with 8 clients at once.
Every engine reads the same files the same way (decoded small, resized to the processor's target);
the answers of (b) and (c) are compared with (a)'s. Without ``--adapter`` a tiny random Qwen3-VL (the
demo's size) with an untrained language-model LoRA is built, served as a vLLM LoRA. On a CPU the server
runs float32 and eager; these are CPU figures, not GPU ones.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

from bbox_sft.decoding import ForcedTokenDecoder  # noqa: E402
from bbox_sft.images import open_image  # noqa: E402
from bbox_sft.predict import BoxPredictor  # noqa: E402
from bbox_sft.server_client import ServerPredictor  # noqa: E402
from bbox_sft.serving import ServeArguments, VllmServer  # noqa: E402


def tiny_lora(tmp: Path) -> Path:
    """A tiny random Qwen3-VL (hidden 256, 4 layers) and an untrained LoRA on its language model."""
    from transformers import AutoProcessor

    from bbox_sft.model import LANGUAGE_LORA_TARGETS, set_pixel_budget
    from bbox_sft.tiny import save_random_lora, save_tiny_model

    base = save_tiny_model(tmp / "tiny-qwen3-vl")
    processor = AutoProcessor.from_pretrained(base)
    set_pixel_budget(processor, 192, 224)
    processor.save_pretrained(base)
    return save_random_lora(base, tmp / "lora", {"task": "subject", "answer_format": "json", "image_min_side": 192,
                                                 "image_max_side": 224}, target_modules=LANGUAGE_LORA_TARGETS)


def photos(tmp: Path, n: int) -> list[Path]:
    from bbox_sft.data.synthetic import write_synthetic_set

    write_synthetic_set(tmp / "synth", n=n, seed=3)
    return sorted((tmp / "synth" / "DUTS-TR" / "DUTS-TR-Image").glob("*.jpg"))[:n]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(results) -> tuple[list, float]:
    start = time.perf_counter()
    out = list(results)
    return out, len(out) / (time.perf_counter() - start)


def raw_requests(remote: ServerPredictor, paths: list[Path], max_tokens: int, clients: int = 8) -> float:
    """Images/s of plain requests with no grammar, each forced to write ``max_tokens`` tokens."""
    import httpx

    from bbox_sft.server_client import chat_request, data_url

    urls = [data_url(open_image(p, remote.processor)[0]) for p in paths]
    body = lambda url: {**chat_request(remote.model, url, remote.task.instruction(), max_tokens, None),  # noqa: E731
                        "ignore_eos": True, "logprobs": False}
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda u: httpx.post(f"{remote.server}/chat/completions", json=body(u), timeout=600)
                      .raise_for_status(), urls))
    return len(urls) / (time.perf_counter() - start)


def latencies(remote: ServerPredictor, paths: list[Path], clients: int) -> list[float]:
    """Seconds per request, ``clients`` clients each sending its share one request at a time."""
    prepared = [open_image(p, remote.processor)[0] for p in paths]
    instruction = remote.task.instruction()

    def client(k: int) -> list[float]:
        seen = []
        for image in prepared[k::clients]:
            start = time.perf_counter()
            remote.answer(image, instruction)
            seen.append(time.perf_counter() - start)
        return seen

    with ThreadPoolExecutor(clients) as pool:
        return [s for part in pool.map(client, range(clients)) for s in part]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", help="adapter folder (default: a tiny random LoRA)")
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--vllm_python", default=str(REPO / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--dtype", default="float32" if not torch.cuda.is_available() else "auto")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        adapter = Path(args.adapter) if args.adapter else tiny_lora(tmp)
        paths = photos(tmp, args.images)
        serve = ServeArguments(adapter=[str(adapter)], vllm_python=args.vllm_python, port=free_port(),
                               dtype=args.dtype, enforce_eager=not torch.cuda.is_available(),
                               merged_dir=str(tmp / "merged"), max_model_len=4096)
        server = VllmServer(serve, tmp / "serve.log", env={"VLLM_CPU_KVCACHE_SPACE": "2"})
        try:  # the server starts while the local model loads; every engine is timed with it up and idle
            local = BoxPredictor.from_pretrained(adapter, batch_size=8)
            print(f"{len(paths)} images, {torch.get_num_threads()} CPU threads"
                  f"{', ' + torch.cuda.get_device_name() if torch.cuda.is_available() else ''}; adapter {adapter}")
            url = server.wait()
            remote = ServerPredictor.from_pretrained(adapter, url, max_in_flight=8)
            list(remote.predict_files(paths[:8]))  # warm-up, not timed
            list(local.predict_files(paths[:8]))
            a, speed_a = timed(local.predict_files(paths))
            supports = ForcedTokenDecoder.supports
            ForcedTokenDecoder.supports = classmethod(lambda cls, m: False)
            try:
                b, speed_b = timed(local.predict_files(paths))
            finally:
                ForcedTokenDecoder.supports = supports
            c, speed_c = timed(remote.predict_files(paths))
            same_b = sum(x.prediction.raw == y.prediction.raw for x, y in zip(a, b))
            same_c = sum(x.prediction.raw == y.prediction.raw for x, y in zip(a, c))
            spread = max(abs(x.prediction.spread - y.prediction.spread) for x, y in zip(a, c))
            print(f"  (a) BoxPredictor, fast-forward  : {speed_a:7.1f} images/s")
            print(f"  (b) generate + grammar          : {speed_b:7.1f} images/s, answers = (a) on {same_b}/{len(a)}")
            print(f"  (c) vLLM server, 8 in flight    : {speed_c:7.1f} images/s, answers = (a) on {same_c}/{len(a)}, "
                  f"largest spread difference {spread:.2g}")
            tokens = round(statistics.mean(len(local.processor.tokenizer.encode(x.prediction.raw)) + 1 for x in a))
            speed_d, speed_e = raw_requests(remote, paths, tokens), raw_requests(remote, paths, 1)
            print(f"  (d) server, no grammar, {tokens} tokens: {speed_d:7.1f} images/s")
            print(f"  (e) server, one token (prefill)  : {speed_e:7.1f} images/s")
            print(f"  (c) vs (a): {speed_c / speed_a:.2f}x; (c) vs (b): {speed_c / speed_b:.2f}x; "
                  f"(c) vs (d), the grammar's cost on the server: {speed_c / speed_d:.2f}x")
            for clients in (1, 8):
                seen = sorted(latencies(remote, paths[:64], clients))
                p95 = seen[min(len(seen) - 1, round(0.95 * (len(seen) - 1)))]
                print(f"  server latency, {clients} client{'s' if clients > 1 else ' '}: p50 "
                      f"{1000 * statistics.median(seen):6.0f} ms, p95 {1000 * p95:6.0f} ms ({len(seen)} requests)")
        finally:
            server.stop()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
