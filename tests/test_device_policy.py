"""Where a run computes and in which precision follows what it was told, then the hardware: on a simulated GPU.

No GPU here (and the suite hides any, see conftest.py), so a visible one is simulated: ``torch.cuda`` answers as a
machine with a GPU would, and transformers' bf16 check passes. A run told to stay on the CPU (``accelerate launch
--cpu`` sets ``ACCELERATE_USE_CPU``; ``use_cpu`` in the recipe) trains and predicts in fp32 on the CPU whatever is
visible; untold, a GPU with native bf16 gets bf16 mixed precision, one that only emulates it (a T4) fp16, and
weights that train in full stay fp32.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "tiny_cpu.yaml")


@pytest.fixture
def gpu(monkeypatch):
    """A visible CUDA GPU, bf16-native by default (``gpu(native_bf16=False)``: a T4, which only emulates bf16)."""
    import transformers.training_args

    def simulate(native_bf16: bool = True) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True:
                            native_bf16 or including_emulation)
        monkeypatch.setattr(transformers.training_args, "is_torch_bf16_gpu_available", lambda: native_bf16)

    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    simulate()
    return simulate


def test_the_device_follows_what_the_run_was_told_then_the_gpu(gpu, monkeypatch) -> None:
    from bbox_sft.model import detect_device, weights_dtype

    assert detect_device() == detect_device(cpu=False)
    assert (detect_device().device, detect_device().dtype) == ("cuda", torch.bfloat16)
    assert (detect_device(cpu=True).device, detect_device(cpu=True).dtype) == ("cpu", torch.float32)
    assert weights_dtype(detect_device(), trains_in_full=True) == torch.float32  # AdamW's updates kept
    assert weights_dtype(detect_device(), trains_in_full=False) == torch.bfloat16  # a frozen LoRA base
    gpu(native_bf16=False)  # bf16 only emulated: fp16 mixed precision
    assert detect_device().dtype == torch.float16
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # what `accelerate launch --cpu` sets for its script
    assert (detect_device().device, detect_device().dtype) == ("cpu", torch.float32)


@pytest.mark.parametrize("told", ["accelerate launch --cpu", "use_cpu in the recipe"])
def test_a_run_told_cpu_trains_in_fp32_on_the_cpu_beside_a_gpu(gpu, monkeypatch, told: str) -> None:
    """transformers' arguments pick their device while parsing: without the policy this would ask CUDA (which
    the simulated GPU cannot give) or default to bf16 mixed precision."""
    from bbox_sft.train import parse_args

    extra = ["--use_cpu", "true"] if told == "use_cpu in the recipe" else []
    if told == "accelerate launch --cpu":
        monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    script_args, training_args, model_args = parse_args([RECIPE, *extra])
    assert (training_args.bf16, training_args.fp16, training_args.use_cpu) == (False, False, True), told
    assert training_args.device.type == "cpu"
    assert model_args.dtype is None  # derived in build_trainer: fp32 weights for this full fine-tuning


def test_predict_told_cpu_loads_on_the_cpu_in_fp32_beside_a_gpu(gpu, monkeypatch, adapter_dir: Path) -> None:
    """A simulated GPU cannot hold a model: without the policy this would try to move it to CUDA and fail."""
    from bbox_sft.predict import load_for_inference

    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    model, _ = load_for_inference(adapter_dir)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
