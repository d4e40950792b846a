"""``make demo DEMO_PROFILE=grpo``: does GRPO beat more SFT for the same compute? Measured side by side.

After ``make demo`` (run first where its outputs are missing), from its SFT adapter (``outputs/demo/lora``):

1. GRPO (``accelerate launch bbox_sft/grpo.py recipes/demo_grpo.yaml``): the adapter trained further on the IoU of
   sampled answers, every rollout inside the grammar, for ``seconds`` of training;
2. SFT continued from the same adapter on the same data (``recipes/demo_sft_more.yaml``) for the same seconds
   (``max_train_seconds``: both stop at a saved, evaluated step, the best checkpoint by validation IoU kept);
3. ``bbox-sft eval`` of the three adapters on the held-out domain-B test split;
4. ``outputs/demo_grpo/report.md`` (+ ``.json``): rows ``adapter`` (the starting SFT adapter), ``continued_sft``
   and ``grpo``, each method's steps and seconds, GRPO's reward and validation curve, the wall time of each stage.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from pathlib import Path

from .demo import TRAIN_THREADS, Stages, _bin, run_demo
from .evaluation import markdown_table
from .tasks import get_task

logger = logging.getLogger("bbox_sft.demo")

TRAIN_SECONDS = 200  # each method's training time, evaluations included
ROWS = {"adapter": "the SFT adapter (start)", "continued_sft": "SFT continued", "grpo": "GRPO"}


def run_rl_demo(seconds: float = TRAIN_SECONDS, output_dir: str | None = None, sft_dir: str | None = None,
                data_dir: str | None = None, sft_profile: str = "full") -> dict:
    """GRPO against continued SFT from the demo's SFT adapter (``sft_dir``, on ``data_dir``; the ``sft_profile``
    demo is run first where they are missing), ``seconds`` of training each, evaluated on the test split."""
    sft_out, data = Path(sft_dir or "outputs/demo"), Path(data_dir or "data/demo")
    out = Path(output_dir or "outputs/demo_grpo")
    start = time.perf_counter()
    stages = Stages()
    if not (sft_out / "lora" / "adapter_config.json").is_file() or not (data / "domain_b").is_dir():
        logger.info("== the SFT demo first: %s or %s is missing", sft_out / "lora", data / "domain_b")
        began = time.perf_counter()
        run_demo(sft_profile, str(sft_out), str(data))
        stages.seconds["SFT demo (make demo)"] = round(time.perf_counter() - began, 1)
    adapter, dataset = sft_out / "lora", data / "domain_b"
    common = ["--model_name_or_path", str(adapter), "--dataset_name", str(dataset),
              "--max_train_seconds", str(seconds)]
    runs = {"grpo": ("bbox_sft/grpo.py", "recipes/demo_grpo.yaml"),
            "continued_sft": ("bbox_sft/train.py", "recipes/demo_sft_more.yaml")}
    for name, (script, recipe) in runs.items():
        shutil.rmtree(out / name, ignore_errors=True)
        stages.run(f"{ROWS[name]}: training", [
            _bin("accelerate"), "launch", "--num_processes", "1", script, recipe, *common,
            "--output_dir", str(out / name)], threads=TRAIN_THREADS)

    rows, trained = {}, {}
    for name, folder in (("adapter", adapter), *((n, out / n) for n in runs)):
        stages.run(f"{ROWS[name]}: evaluation", [
            _bin("bbox-sft"), "eval", "--adapter", str(folder), "--dataset", str(dataset), "--split", "test",
            "--output_dir", str(out / "eval" / name)])
        metrics = json.loads((out / "eval" / name / "metrics.json").read_text())
        rows[name] = metrics["rows"]["adapter"]
        if name in runs:
            trained[name] = _training(folder)
    report = {
        "profile": "grpo",
        "rows": rows,
        "test_images": metrics["evaluated"],
        "training": trained,
        "seconds_each": seconds,
        "stage_seconds": stages.seconds,
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    shutil.copy(out / "grpo" / "training_curves.png", out / "grpo_curves.png")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    sys.stdout.write("\n" + markdown(report))
    return report


def _training(folder: Path) -> dict:
    """What a run trained: its steps, its training seconds, the checkpoint kept and its validation IoU."""
    state = json.loads((folder / "trainer_state.json").read_text())
    history = state["log_history"]
    summary = next(e for e in history if "train_runtime" in e)
    evals = [(e["step"], e["eval_mean_iou"]) for e in history if "eval_mean_iou" in e]
    best = state.get("best_model_checkpoint")
    return {"steps": state["global_step"], "train_seconds": round(summary["train_runtime"], 1),
            "kept_step": int(best.rsplit("-", 1)[-1]) if best else state["global_step"],
            "validation": evals,
            "rewards": [(e["step"], e["reward"]) for e in history if "reward" in e]}


def markdown(report: dict) -> str:
    task = get_task("subject")
    rows = {ROWS[name]: metrics for name, metrics in report["rows"].items()}
    runs = "\n".join(f"| {ROWS[name]} | {t['steps']} | {t['train_seconds']:.0f} s | {t['kept_step']} |"
                     for name, t in report["training"].items())
    times = "\n".join(f"| {stage} | {seconds:.0f} s |" for stage, seconds in report["stage_seconds"].items())
    return f"""# bbox-sft demo (grpo profile): GRPO against more SFT, the same training time

From the demo's SFT adapter, {report['seconds_each']:.0f} s of training each (evaluations included); the
checkpoint with the best validation mean IoU kept; {report['test_images']} held-out domain-B test images.

{markdown_table(rows, task.metric_names)}

| method | steps | training time | checkpoint kept |
|---|---|---|---|
{runs}

![GRPO: mean reward and validation mean IoU](grpo_curves.png)

## Wall time

| stage | time |
|---|---|
{times}
| **total** | **{report['total_seconds']:.0f} s** |
"""


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=TRAIN_SECONDS, help="training time of each method")
    parser.add_argument("--output_dir", default=None, help="default: outputs/demo_grpo")
    parser.add_argument("--sft_dir", default=None, help="the SFT demo's outputs (default: outputs/demo)")
    parser.add_argument("--data_dir", default=None, help="the SFT demo's data (default: data/demo)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_rl_demo(args.seconds, args.output_dir, args.sft_dir, args.data_dir)


if __name__ == "__main__":
    main()
