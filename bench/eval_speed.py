"""Generation speed on validation images: naive per-image vs batched vs constrained vs fast-forward.

    python bench/eval_speed.py [--model DIR] [--images 64] [--batch_sizes 1 4 16]

(a) naive: one ``generate`` per image, the full JSON written freely;
(b) batched: left-padded batches, KV cache;
(c) batched + constrained decoding through ``generate`` (one decode step per token);
(d) batched + constrained with the forced tokens fast-forwarded (one pass per choice step);
(e), (f): (c) and (d) in the qwen format.
An objects model (``--model`` trained with ``task: objects``) is asked for its lists, under the list grammar.
(b)-(f) run at each of ``--batch_sizes``. Prints images/s of each, the ratios (c)/(a) (target >= 5x)
and, per batch size, (d)/(c) (target >= 2.5x, with identical boxes on every image) and (f)/(e) (never
slower), where (d)'s time goes (passes per batch, the prefill's share), and whether (a), (b) and (c)
give the same boxes where the model is sure (spread <= --sure). Fast-forward saves decode steps, not
the work inside them: it pays most where a step costs its latency (one image at a time, a GPU) and
least where the forced tokens' compute dominates (large batches on a few CPU cores). Without --model,
the tiny recipe is trained briefly first so the model has something to be sure about.
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
from bbox_sft.predict import load_for_inference  # noqa: E402
from bbox_sft.saved_run import SavedRun  # noqa: E402

supports = ForcedTokenDecoder.supports


def trained_tiny(tmp: str, steps: int) -> Path:
    from bbox_sft.train import main, parse_args

    os.chdir(REPO)
    out = Path(tmp) / "tiny"
    main(*parse_args([str(REPO / "recipes/tiny_cpu.yaml"), "--max_steps", str(steps), "--output_dir", str(out),
                      "--save_strategy", "no", "--disable_tqdm", "true", "--log_level", "error"]))
    return out


def run(model, processor, images, via_generate: bool = False, **kwargs) -> tuple[list, float, list[tuple[bool, float]]]:
    """Predictions, images/s and (prefill?, seconds) of each forward pass of one decoding configuration
    (``via_generate``: the grammar through generate). Timed by hooks on the transformers model, which both
    paths call once per pass (peft's generate calls it alone)."""
    ForcedTokenDecoder.supports = classmethod(lambda cls, m: False) if via_generate else supports
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    passes: list[tuple[bool, float]] = []
    started: list[float] = []
    hooks = [base.register_forward_pre_hook(lambda m, a, kw: started.append(time.perf_counter()), with_kwargs=True),
             base.register_forward_hook(lambda m, a, kw, out: passes.append(
                 (kw.get("pixel_values") is not None, time.perf_counter() - started.pop())), with_kwargs=True)]
    try:
        start = time.perf_counter()
        results = generate_answers(model, processor, images, progress=False, **kwargs)
        return results, len(images) / (time.perf_counter() - start), passes
    finally:
        ForcedTokenDecoder.supports = supports
        for hook in hooks:
            hook.remove()


def answer(prediction):
    """What a prediction found: its box, or its list of labelled boxes."""
    return prediction.box if prediction.objects is None else prediction.objects


def report(name: str, results: list, speed: float) -> None:
    parsed = sum(answer(p) is not None for p in results) / len(results)
    print(f"{name:>34}: {speed:7.1f} images/s, parse rate {parsed:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="trained adapter or model folder (default: train the tiny recipe briefly)")
    parser.add_argument("--dataset", default=str(REPO / "data/tiny_cpu"))
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 4, 16],
                        help="batch sizes to compare at; the last is the one (c) vs (a) uses")
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
        run_of = SavedRun.read(model_dir)
        answer_format, task = run_of.answer_format.name, run_of.task.name
        if run_of.task.takes_query:
            parser.error(f"this benchmark asks models without a query; {model_dir} is a {task} model")
        question = dict(task=run_of.task, labels=run_of.labels)
        other = "qwen" if answer_format == "json" else "json"
        print(f"{len(images)} images, task {task}, answer format {answer_format}, {torch.get_num_threads()} CPU "
              f"threads{', ' + torch.cuda.get_device_name() if torch.cuda.is_available() else ''}")
        a, speed_a, _ = run(model, processor, images, batch_size=1, constrained=False, answer_format=answer_format,
                         **question)
        report("(a) naive per-image", a, speed_a)
        summary = []
        for batch_size in args.batch_sizes:
            print(f"batch size {batch_size}:")
            constrained = dict(batch_size=batch_size, constrained=True, answer_format=answer_format, **question)
            b, speed_b, _ = run(model, processor, images, batch_size=batch_size, constrained=False,
                             answer_format=answer_format, **question)
            report("(b) batched", b, speed_b)
            c, speed_c, passes_c = run(model, processor, images, via_generate=True, **constrained)
            report("(c) batched + constrained", c, speed_c)
            d, speed_d, log = run(model, processor, images, **constrained)
            report("(d) constrained, fast-forward", d, speed_d)
            e, speed_e, _ = run(model, processor, images, via_generate=True, **{**constrained, "answer_format": other})
            report(f"(e) (c) in {other} format", e, speed_e)
            f, speed_f, _ = run(model, processor, images, **{**constrained, "answer_format": other})
            report(f"(f) (d) in {other} format", f, speed_f)
            batches = sum(prefill for prefill, _ in log)
            prefill_s = sum(s for prefill, s in log if prefill)
            passes_s = [s for prefill, s in log if not prefill]
            print(f"{'':>36}(d): {len(log) / batches:.1f} forward passes per batch against (c)'s "
                  f"{len(passes_c) / batches:.1f}; the prefill (vision tower "
                  f"and prompt) {prefill_s / (len(images) / speed_d):.0%} of its time, later passes "
                  f"{1000 * sum(passes_s) / max(1, len(passes_s)):.1f} ms each")
            summary.append((batch_size, speed_d / speed_c, sum(x.raw == y.raw for x, y in zip(c, d)),
                            speed_f / speed_e, sum(x.raw == y.raw for x, y in zip(e, f))))
    print("fast-forward against generate with the grammar, same model, same images, same run:")
    for batch_size, ff, same, qf, q_same in summary:
        print(f"  batch size {batch_size:>3}: (d) vs (c) {ff:.1f}x images/s (target >= 2.5x: "
              f"{'met' if ff >= 2.5 else 'NOT met'}), identical answers on {same}/{len(images)}; "
              f"{other} format (f) vs (e) {qf:.1f}x ({'not slower' if qf >= 1 else 'SLOWER'}), "
              f"identical on {q_same}/{len(images)}")
    sure = [i for i, p in enumerate(c) if p.spread is not None and p.spread <= args.sure and a[i].box is not None]
    same = lambda x, y: sum(answer(p) == answer(q) for p, q in zip(x, y))  # noqa: E731
    ratio = speed_c / speed_a
    print(f"(c) at batch size {args.batch_sizes[-1]} vs (a): {ratio:.1f}x images/s "
          f"(target >= 5x: {'met' if ratio >= 5 else 'NOT met'})")
    print(f"all {len(images)} images: (a) = (c) on {same(a, c)}, (b) = (c) on {same(b, c)}")
    same_ac, same_bc = sum(a[i].box == c[i].box for i in sure), sum(b[i].box == c[i].box for i in sure)
    print(f"where the model is sure (spread <= {args.sure}, {len(sure)} of {len(images)} images): "
          f"(a) = (c) on {same_ac}, (b) = (c) on {same_bc}")


if __name__ == "__main__":
    main()
