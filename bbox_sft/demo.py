"""``make demo``: the whole mission on the embedded default, on CPU, through the commands a user runs.

1. synthetic domains A and B as files on disk (``bbox-sft synth``), built into datasets
   (``bbox-sft prepare``);
2. a base model: the tiny Qwen3-VL fully fine-tuned on domain A (``recipes/demo_base.yaml``),
   standing in for the pretrained Qwen3-VL-2B; cached, so a second demo skips it;
3. LoRA on that base for domain B (``accelerate launch bbox_sft/train.py recipes/demo_lora.yaml``)
   with the generation-based IoU validation on;
4. ``bbox-sft eval`` on the held-out domain-B test split (adapter / base / center prior) and
   ``bbox-sft predict`` on new domain-B images;
5. ``outputs/demo/report.md`` (+ ``.json``): the rows, the validation curve, a grid of test
   predictions and the wall time of each stage.

The ``objects`` profiles run the same stages for the objects task (every shape in the image, as a
labelled list): synthetic COCO sets (``bbox-sft synth --task objects``) for both domains, a base fully
fine-tuned on domain A's lists, LoRA for domain B's, rows adapter / base / prior on F1@0.5 and mAP,
under ``outputs/demo_objects``. The ``refer`` profiles do the same for referring expressions (the shape
a description picks out, among two or three), rows on Acc@0.5 and IoU, under ``outputs/demo_refer``.

    python -m bbox_sft.demo [--profile fast|objects|objects_fast|refer|refer_fast]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .evaluation import confidence_sentence, markdown_table
from .tasks import get_task
from .visualize import save_training_curves

logger = logging.getLogger("bbox_sft.demo")
REPO = Path(__file__).resolve().parents[1]


# objects: 1-3 shapes per image (each category its own hue), half-sizes 14-30 % of the image side
OBJECT_SHAPES = ("--min_objects", "1", "--max_objects", "3", "--min_size", "0.14", "--max_size", "0.3")


@dataclass(frozen=True)
class Profile:
    """Sizes of one demo run; ``full`` is ``make demo``, ``fast`` the reduced one the tests run."""

    images_a: int
    images_b: int
    train_b: int
    test_b: int
    base_steps: int
    lora_steps: int
    hidden_size: int
    layers: int
    eval_steps: int
    task: str = "subject"
    name: str = "demo"  # outputs/<name>, data/<name>
    task_args: tuple[str, ...] = ()  # what synth, prepare and train are told of the task
    synth_args: tuple[str, ...] = ()
    base_synth_args: tuple[str, ...] | None = None  # domain A's, where they differ (default: synth_args)
    heldout: tuple[str, str] = ("--dir", "DUTS-TR/DUTS-TR-Image")  # what predict reads in the held-out folder
    what: str = ""  # the demo's task, for the report

    @property
    def metric(self) -> str:
        """The validation metric the adapter is picked by, and the curve shows."""
        return get_task(self.task).metric_for_best_model


_OBJECTS = dict(task="objects", name="demo_objects", task_args=("--task", "objects"), synth_args=OBJECT_SHAPES,
                heldout=("--dir", "images"), what=" for the objects task (every shape, as a labelled list)")
# refer: an expression per shape ("the small red ellipse", "the star on the left"); domain B's images hold
# two shapes, so the expression decides; domain A's one or two, where the base learns to find shapes at all
REFER_SHAPES = ("--min_size", "0.18", "--max_size", "0.35", "--max_objects", "2")
_REFER = dict(task="refer", name="demo_refer", task_args=("--task", "refer"), heldout=("--queries", "refs.jsonl"),
              synth_args=(*REFER_SHAPES, "--min_objects", "2"), base_synth_args=(*REFER_SHAPES, "--min_objects", "1"),
              what=" for the refer task (the shape a description picks out of two)")
PROFILES = {
    "full": Profile(images_a=2400, images_b=1200, train_b=1000, test_b=100, base_steps=1200, lora_steps=300,
                    hidden_size=256, layers=4, eval_steps=100),
    "fast": Profile(images_a=800, images_b=300, train_b=220, test_b=40, base_steps=260, lora_steps=100,
                    hidden_size=256, layers=4, eval_steps=50),
    "objects": Profile(images_a=2400, images_b=1200, train_b=1000, test_b=100, base_steps=1200, lora_steps=300,
                       hidden_size=256, layers=4, eval_steps=100, **_OBJECTS),
    "objects_fast": Profile(images_a=500, images_b=220, train_b=160, test_b=24, base_steps=200, lora_steps=60,
                            hidden_size=256, layers=4, eval_steps=30, **_OBJECTS),
    "refer": Profile(images_a=1200, images_b=600, train_b=480, test_b=60, base_steps=1200, lora_steps=300,
                     hidden_size=256, layers=4, eval_steps=100, **_REFER),
    "refer_fast": Profile(images_a=400, images_b=160, train_b=110, test_b=24, base_steps=240, lora_steps=60,
                          hidden_size=256, layers=4, eval_steps=30, **_REFER),
}


# The CPU code paths the demo's numbers come from. Training is deterministic on one machine, but its floats
# depend on the kernels a CPU picks: ATen's vector width, MKL's and oneDNN's instruction sets, the thread count
# (each changes the weights after 40 steps, bit for bit; each pinned here gives what a 2-core AVX2 machine
# computes by default: accelerate trains a CPU process on 1 thread, evaluation takes one per core). Pinned on
# x86-64 CPUs, where not set already, so a machine with AVX-512 or more cores runs the same paths.
PINNED_CPU = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
TRAIN_THREADS, EVAL_THREADS = 1, 2


def demo_env(threads: int = EVAL_THREADS) -> dict[str, str]:
    """The environment of a stage: offline, and on x86-64 the pinned CPU kernels and thread count (a user's
    own settings win)."""
    pinned = {**PINNED_CPU, "OMP_NUM_THREADS": str(threads)} if platform.machine().lower() in ("x86_64",
                                                                                              "amd64") else {}
    return {**pinned, **os.environ, "HF_HUB_OFFLINE": "1"}


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


class Stages:
    """Runs each stage as the command a user would type, and times it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def run(self, stage: str, *commands: list[str], threads: int = EVAL_THREADS) -> None:
        logger.info("== %s", stage)
        start = time.perf_counter()
        for command in commands:
            logger.info("$ %s", " ".join(command))
            subprocess.run(command, cwd=REPO, check=True, env=demo_env(threads))
        self.seconds[stage] = round(time.perf_counter() - start, 1)


def default_dirs(profile_name: str) -> tuple[str, str]:
    """(outputs, data) of a profile: each task's profiles keep theirs apart from the others'."""
    name = PROFILES[profile_name].name
    return f"outputs/{name}", f"data/{name}"


def run_demo(profile_name: str = "full", output_dir: str | None = None, data_dir: str | None = None) -> dict:
    profile = PROFILES[profile_name]
    out, data = (Path(d or default) for d, default in zip((output_dir, data_dir), default_dirs(profile_name)))
    stages = Stages()
    start = time.perf_counter()
    synth = [_bin("bbox-sft"), "synth", *profile.task_args, *profile.synth_args]
    synth_a = [_bin("bbox-sft"), "synth", *profile.task_args, *(profile.base_synth_args or profile.synth_args)]
    stages.run(
        "synthetic data",
        [*synth_a, "--output_dir", str(data / "synth_a"), "--n", str(profile.images_a), "--seed", "1",
         "--domain", "plain"],
        [*synth, "--output_dir", str(data / "synth_b"), "--n", str(profile.images_b), "--seed", "2",
         "--domain", "cluttered"],
        [*synth, "--output_dir", str(data / "heldout_b"), "--n", "8", "--seed", "3", "--domain", "cluttered"],
    )
    prepare = [_bin("bbox-sft"), "prepare", *profile.task_args]
    train_a = profile.images_a - 200
    stages.run(
        "datasets",
        [*prepare, "--data_dir", str(data / "synth_a"), "--output_dir", str(data / "domain_a"),
         "--train_size", str(train_a), "--val_size", "100", "--test_size", "100"],
        [*prepare, "--data_dir", str(data / "synth_b"), "--output_dir", str(data / "domain_b"), "--train_size",
         str(profile.train_b), "--val_size", str(profile.test_b), "--test_size", str(profile.test_b), "--visualize"],
    )

    train = [_bin("accelerate"), "launch", "--num_processes", "1", "bbox_sft/train.py"]
    task = [*profile.task_args, "--metric_for_best_model", profile.metric] if profile.task_args else []
    base_dir = out / "base"
    if (base_dir / "config.json").is_file():
        logger.info("== base model: cached in %s (delete it to train again)", base_dir)
        stages.seconds["base model (cached)"] = 0.0
    else:
        stages.run("base model: full fine-tuning on domain A", [
            *train, "recipes/demo_base.yaml", "--model_name_or_path", str(out / "tiny-init"),
            "--dataset_name", str(data / "domain_a"), "--data_dir", str(data / "synth_a"),
            "--output_dir", str(base_dir), "--max_steps", str(profile.base_steps),
            "--tiny_hidden_size", str(profile.hidden_size), "--tiny_layers", str(profile.layers), *task,
        ], threads=TRAIN_THREADS)
    lora_dir = out / "lora"
    shutil.rmtree(lora_dir, ignore_errors=True)
    stages.run("LoRA on domain B", [
        *train, "recipes/demo_lora.yaml", "--model_name_or_path", str(base_dir),
        "--dataset_name", str(data / "domain_b"), "--output_dir", str(lora_dir),
        "--max_steps", str(profile.lora_steps), "--eval_steps", str(profile.eval_steps),
        "--save_steps", str(profile.eval_steps), *task,
    ], threads=TRAIN_THREADS)
    stages.run("evaluation", [
        _bin("bbox-sft"), "eval", "--adapter", str(lora_dir), "--dataset", str(data / "domain_b"),
        "--split", "test", "--output_dir", str(out / "eval"),
    ])
    flag, heldout = profile.heldout
    with open(out / "predictions.jsonl", "w") as predictions:
        stages.seconds["prediction"] = _predict(lora_dir, [flag, str(data / "heldout_b" / heldout)],
                                                out / "predictions", predictions)

    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    history = json.loads((lora_dir / "trainer_state.json").read_text())["log_history"]
    curve = save_training_curves(history, out / "validation_curve.png", profile.metric,
                                 "validation " + profile.metric.removeprefix("eval_").replace("_", " "))
    shutil.copy(out / "eval" / "grid.png", out / "test_predictions.png")
    report = {
        "profile": profile_name,
        "task": profile.task,
        "sizes": {k: v for k, v in asdict(profile).items() if k not in ("name", "task_args", "synth_args", "heldout",
                                                                         "what", "base_synth_args")},
        "rows": metrics["rows"],
        "test_images": metrics["evaluated"],
        "confidence": metrics.get("confidence"),
        "prior": metrics.get("prior") or metrics.get("center_prior_source"),
        "validation": [{k: e[k] for k in ("step", profile.metric, "eval_loss")} for e in history
                       if profile.metric in e],
        "stage_seconds": stages.seconds,
        "total_seconds": round(time.perf_counter() - start, 1),
        "pictures": {"validation_curve": curve.name, "test_predictions": "test_predictions.png"},
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    sys.stdout.write("\n" + markdown(report))
    return report


def _predict(adapter: Path, images: list[str], output: Path, sink) -> float:
    start = time.perf_counter()
    command = [_bin("bbox-sft"), "predict", "--adapter", str(adapter), *images, "--output", str(output)]
    logger.info("== prediction\n$ %s", " ".join(command))
    subprocess.run(command, cwd=REPO, check=True, stdout=sink, env=demo_env())
    return round(time.perf_counter() - start, 1)


def _confidence(report: dict) -> str:
    line = confidence_sentence(report.get("confidence"))
    return f"\n{line} On the test images; reliability plot: `eval/reliability.png`.\n" if line else ""


def markdown(report: dict) -> str:
    profile = PROFILES[report["profile"]]
    task, metric = get_task(profile.task), profile.metric
    times = "\n".join(f"| {stage} | {seconds:.0f} s |" for stage, seconds in report["stage_seconds"].items())
    curve = "\n".join(f"| {e['step']} | {e[metric]:.3f} | {e['eval_loss']:.3f} |" for e in report["validation"])
    truth = "truth green, prediction red" + (", labelled" if task.answers_list else "")
    prior = f"\n{task.prior_row}: {report['prior']}." + (
        " mAP ranks each image's boxes by their per-object scores." if task.answers_list else "") + "\n"
    return f"""# bbox-sft demo ({report['profile']} profile)

LoRA on domain B over a tiny Qwen3-VL base trained on domain A{profile.what}; {report['test_images']} held-out
domain-B test records.

{markdown_table(report['rows'], task.metric_names)}
{prior}{_confidence(report)}
## Validation during LoRA training (generation-based)

| step | {metric} | eval_loss |
|---|---|---|
{curve}

![validation curve](validation_curve.png)

## Test predictions ({truth})

![test predictions](test_predictions.png)

## Wall time

| stage | time |
|---|---|
{times}
| **total** | **{report['total_seconds']:.0f} s** |
"""


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the bbox-sft demo end to end on CPU.")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full")
    parser.add_argument("--output_dir", default=None, help="default: outputs/<the profile's name>, e.g. outputs/demo")
    parser.add_argument("--data_dir", default=None, help="default: data/<the profile's name>, e.g. data/demo")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_demo(args.profile, args.output_dir, args.data_dir)


if __name__ == "__main__":
    main()
