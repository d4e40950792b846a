"""Every recipe field of TRL's ``ModelConfig`` (and the ``SFTConfig`` fields we override) takes effect or is refused.

Each field is set to a value other than its default on top of the tiny LoRA recipe, and the trainer
is built (no training): the value must be visible in the loaded model, the peft config or the
trainer's arguments, or the build must stop with a ``ValueError`` naming the field, before the
output folder is written. A field that TRL adds later has no row here, and the coverage test fails
until it is handled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from trl import ModelConfig

from bbox_sft.train import build_trainer, parse_args

REPO = Path(__file__).resolve().parents[1]
REFUSED = "refused"
VISION_PARAMETER = "model.visual.blocks.0.mlp.linear_fc1.weight"  # not among the default LoRA targets


def _lora(trainer):
    return trainer.model.peft_config["default"]


# field -> (value on the command line, check on the built trainer, or REFUSED)
MODEL_FIELDS: dict[str, tuple[str, Callable | str]] = {
    "model_name_or_path": ("<other model>", lambda t, other: t.model.get_base_model().config._name_or_path == other),
    "model_revision": ("v2.0", REFUSED),  # a local folder has no revisions
    "dtype": ("bfloat16", lambda t, _: t.model.get_base_model().dtype == torch.bfloat16),
    "attn_implementation": ("eager", lambda t, _: t.model.get_base_model().config._attn_implementation == "eager"),
    "use_peft": ("false", lambda t, _: not isinstance(t.model, PeftModel)),
    "lora_r": ("4", lambda t, _: _lora(t).r == 4),
    "lora_alpha": ("7", lambda t, _: _lora(t).lora_alpha == 7),
    "lora_dropout": ("0.2", lambda t, _: _lora(t).lora_dropout == 0.2),
    "lora_target_modules": ("q_proj", lambda t, _: _lora(t).target_modules == {"q_proj"}
                            and all("q_proj" in n for n, p in t.model.named_parameters() if p.requires_grad)),
    "lora_target_parameters": (VISION_PARAMETER, REFUSED),  # the recipe's lora_dropout 0.05: peft cannot; see below
    "lora_modules_to_save": ("lm_head", lambda t, _: "lm_head" in _lora(t).modules_to_save),
    "lora_task_type": ("SEQ_CLS", REFUSED),
    "use_rslora": ("true", lambda t, _: _lora(t).use_rslora),
    "use_dora": ("true", lambda t, _: _lora(t).use_dora and any("lora_magnitude" in n for n, _ in
                                                                  t.model.named_parameters())),
    "load_in_8bit": ("true", REFUSED),  # no CUDA here
    "load_in_4bit": ("true", REFUSED),
    "bnb_4bit_quant_type": ("fp4", REFUSED),  # without load_in_4bit it would change nothing
    "use_bnb_nested_quant": ("true", REFUSED),
    "bnb_4bit_quant_storage": ("uint8", REFUSED),
}
# The SFTConfig fields the recipe path sets or depends on.
SFT_FIELDS: dict[str, tuple[str, Callable | str]] = {
    "max_length": ("4096", lambda t, _: t.args.max_length == 4096),
    "remove_unused_columns": ("true", REFUSED),  # the collator needs the image and chat columns
    "bf16": ("true", REFUSED),  # transformers refuses bf16 without a GPU
    "fp16": ("true", lambda t, _: t.args.fp16),
}


def _base(model: Path, data: Path, out: Path) -> list[str]:
    return [str(REPO / "recipes" / "tiny_cpu.yaml"), "--model_name_or_path", str(model), "--dataset_name", str(data),
            "--output_dir", str(out), "--image_min_side", "128", "--image_max_side", "160", "--build_tiny_model",
            "false", "--use_peft", "true", "--train_vision_tower", "false", "--train_merger", "false",
            "--disable_tqdm", "true", "--log_level", "error"]


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> Path:
    from bbox_sft.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("other") / "other-tiny", hidden_size=64, layers=1)


def test_every_model_config_field_is_covered() -> None:
    assert set(MODEL_FIELDS) == {f.name for f in fields(ModelConfig)}, "a ModelConfig field without a row here"


@pytest.mark.slow
@pytest.mark.parametrize("name", [*MODEL_FIELDS, *SFT_FIELDS])
def test_a_field_takes_effect_or_is_refused_by_name(name: str, tiny_model_dir: Path, box_dataset_dir: Path,
                                                    other_model: Path, tmp_path: Path) -> None:
    value, check = {**MODEL_FIELDS, **SFT_FIELDS}[name]
    value = str(other_model) if value == "<other model>" else value
    out = tmp_path / "out"
    args = [*_base(tiny_model_dir, box_dataset_dir, out), f"--{name}", value]
    if check == REFUSED:
        with pytest.raises(ValueError) as error:
            build_trainer(*parse_args(args))
        assert name in str(error.value)
        assert not out.exists(), "a refused recipe must not write anything"
    else:
        script_args, training_args, model_args = parse_args(args)
        base = parse_args(_base(tiny_model_dir, box_dataset_dir, out))
        group = 1 if name in SFT_FIELDS else 2
        assert getattr((script_args, training_args, model_args)[group], name) != getattr(base[group], name)
        assert check(build_trainer(script_args, training_args, model_args), str(other_model)), name


@pytest.mark.slow
def test_max_length_shorter_than_a_record_is_refused(tiny_model_dir: Path, box_dataset_dir: Path,
                                                     tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_length 8 is shorter than the longest record"):
        build_trainer(*parse_args([*_base(tiny_model_dir, box_dataset_dir, tmp_path / "o"), "--max_length", "8"]))


@pytest.mark.slow
def test_lora_on_parameters_with_dropout_zero(tiny_model_dir: Path, box_dataset_dir: Path, tmp_path: Path) -> None:
    args = [*_base(tiny_model_dir, box_dataset_dir, tmp_path / "o"), "--lora_target_parameters", VISION_PARAMETER,
            "--lora_dropout", "0"]
    trainer = build_trainer(*parse_args(args))
    assert _lora(trainer).target_parameters == [VISION_PARAMETER]
    assert any("blocks.0.mlp.linear_fc1" in n and "lora_A" in n for n, _ in trainer.model.named_parameters())


@pytest.mark.slow
def test_train_merger_is_layered_on_the_users_modules_to_save(tiny_model_dir: Path, box_dataset_dir: Path,
                                                              tmp_path: Path) -> None:
    args = [*_base(tiny_model_dir, box_dataset_dir, tmp_path / "o"), "--lora_modules_to_save", "lm_head",
            "--train_merger", "true"]
    assert sorted(_lora(build_trainer(*parse_args(args))).modules_to_save) == ["lm_head", "merger"]


def test_qwen_answer_format_on_qwen2_5_vl_is_refused_naming_both(tmp_path: Path) -> None:
    from transformers import Qwen2_5_VLConfig

    from bbox_sft.model import check_answer_format

    Qwen2_5_VLConfig().save_pretrained(tmp_path / "qwen25")
    with pytest.raises(ValueError, match="qwen2_5_vl") as error:
        check_answer_format(str(tmp_path / "qwen25"), "qwen")
    assert "answer_format 'qwen'" in str(error.value) and "qwen25" in str(error.value)
    check_answer_format(str(tmp_path / "qwen25"), "json")  # json fits any model


def test_qlora_quantizes_the_language_model_only(tiny_model_dir: Path) -> None:
    """Which modules a 4-bit run quantizes, by transformers' own matching of the skip list: every linear layer of
    the language model; none of the vision tower, its merger (so train_merger can train it in full) or the head."""
    from transformers import AutoModelForImageTextToText
    from transformers.quantizers.quantizers_utils import should_convert_module
    from trl import ModelConfig

    from bbox_sft.model import quantization_config

    config = quantization_config(ModelConfig(model_name_or_path="x", use_peft=True, load_in_4bit=True,
                                             dtype="bfloat16"))
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    converted = {name for name in linear if should_convert_module(name, config.llm_int8_skip_modules)}
    assert converted and all(".language_model." in name for name in converted)
    assert {name for name in linear if ".language_model." in name} == converted
    assert any("merger" in name for name in linear) and "lm_head" not in converted


def test_a_qlora_run_is_recorded_and_inference_says_it_cannot_reproduce_it_here(adapter_dir: Path, tmp_path: Path,
                                                                              caplog) -> None:
    """The saved run records the base's quantization; on a machine without CUDA and bitsandbytes the base loads
    unquantized and the log says so (a QLoRA adapter validated on nf4 answers differently on a bf16 base)."""
    import json
    import shutil

    from bbox_sft.predict import load_for_inference
    from bbox_sft.saved_run import SavedRun

    folder = tmp_path / "qlora"
    shutil.copytree(adapter_dir, folder)
    args = json.loads((folder / "bbox_sft_args.json").read_text())
    quantized = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "llm_int8_skip_modules": ["model.visual",
                                                                                                "lm_head"]}
    (folder / "bbox_sft_args.json").write_text(json.dumps({**args, "quantization": quantized}))
    assert SavedRun.read(folder).quantization == quantized and SavedRun.read(adapter_dir).quantization is None
    caplog.set_level("WARNING", logger="bbox_sft")  # a build above at --log_level error left the logger there
    model, _ = load_for_inference(folder)
    assert "trained on a 4-bit nf4 base" in caplog.text and "unquantized" in caplog.text
    assert not getattr(model.config, "quantization_config", None)
