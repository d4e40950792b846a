"""``bbox-sft serve``: what is served as a vLLM LoRA and what merged, and the command vLLM is started with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from peft import LoraConfig


def _adapter(folder: Path, base: str, **lora) -> Path:
    folder.mkdir(parents=True)
    config = LoraConfig(r=lora.pop("r", 16), **lora)
    config.base_model_name_or_path = base
    config.save_pretrained(str(folder))
    (folder / "bbox_sft_args.json").write_text(json.dumps({"task": "subject", "answer_format": "json",
                                                           "image_min_side": 320, "image_max_side": 448}))
    return folder


LM = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"


def test_only_language_model_lora_is_served_as_a_lora(tmp_path) -> None:
    from bbox_sft.serving import lora_servable

    assert lora_servable(_adapter(tmp_path / "lm", "base", target_modules=LM)) is None
    merger = _adapter(tmp_path / "merger", "base", target_modules=LM, modules_to_save=["merger"])
    assert "modules_to_save" in lora_servable(merger)
    vision = _adapter(tmp_path / "vision", "base", target_modules=LM + r"|(.*visual\.blocks.*\.(qkv|proj))")
    assert "vision blocks" in lora_servable(vision)


def test_the_vllm_command_carries_grammar_pixel_budget_and_loras(tmp_path) -> None:
    from bbox_sft.serving import PROCESSORS, ServeArguments, VllmPlatform, serve_command

    a = _adapter(tmp_path / "a", "Qwen/Qwen3-VL-2B-Instruct", target_modules=LM, r=8)
    b = _adapter(tmp_path / "b", "Qwen/Qwen3-VL-2B-Instruct", target_modules=LM, r=32)
    command = serve_command(ServeArguments(adapter=[str(a), str(b)], port=8123, tensor_parallel_size=2),
                            platform=VllmPlatform("cuda", "v2"))
    assert command[1:5] == ["-m", "vllm.entrypoints.openai.api_server", "--model", "Qwen/Qwen3-VL-2B-Instruct"]
    options = dict(zip(command, command[1:]))
    assert options["--logits-processors"] == PROCESSORS["v2"] and options["--port"] == "8123"
    assert options["--tensor-parallel-size"] == "2" and options["--max-lora-rank"] == "32"
    # on a GPU: the model's own dtype, compiled graphs, vLLM's memory share; both LoRAs may share a batch
    assert options["--dtype"] == "auto" and "--enforce-eager" not in command and options["--max-loras"] == "2"
    assert "--kv-cache-memory-bytes" not in command and "--gpu-memory-utilization" not in command
    assert json.loads(options["--mm-processor-kwargs"]) == {"min_pixels": 320 * 320, "max_pixels": 448 * 448}
    at = command.index("--lora-modules")
    assert command[at + 1:at + 3] == [f"a={a.resolve()}", f"b={b.resolve()}"]
    merged = serve_command(ServeArguments(adapter=[str(a)]), merged={str(a): str(tmp_path / "merged")})
    assert merged[4] == str(tmp_path / "merged") and "--enable-lora" not in merged
    assert merged[merged.index("--served-model-name") + 1] == "a"
    other = _adapter(tmp_path / "c", "Qwen/Qwen3-VL-8B-Instruct", target_modules=LM)
    with pytest.raises(ValueError, match="one server serves one model"):
        serve_command(ServeArguments(adapter=[str(a), str(other)]))


def test_scores_rebuilt_from_the_top_20_keep_the_written_tokens_probability_among_more_allowed() -> None:
    """A list decision among 30 allowed tokens, of which the server lists the top 20 (vLLM's processed
    log-probabilities, after the grammar's mask): the written token's log-probability among the allowed ones
    comes out as the model's, and a digit step (11 allowed) gives the model's distribution exactly."""
    import torch

    from bbox_sft.decoding import _logprob
    from bbox_sft.server_client import step_scores

    torch.manual_seed(0)
    logits = torch.randn(200) * 3
    for allowed in (list(range(40, 70)), list(range(100, 111))):
        masked = torch.full_like(logits, float("-inf"))
        masked[allowed] = logits[allowed]
        processed = masked.log_softmax(-1)
        top = processed.topk(20)
        listed = [{"token": f"token_id:{int(t)}", "logprob": float(v) if v > -1e30 else -9999.0}
                  for v, t in zip(top.values, top.indices)]
        for written in (int(top.indices[0]), int(top.indices[min(len(allowed), 20) - 1])):
            step = {"token": f"token_id:{written}", "logprob": float(processed[written]), "top_logprobs": listed}
            rebuilt = step_scores(step, 200, allowed)
            assert abs(_logprob(rebuilt, allowed, written) - float(processed[written])) < 1e-5
        if len(allowed) <= 20:  # every allowed token listed: the whole distribution, as the model's
            assert torch.allclose(rebuilt[allowed].softmax(-1), logits[allowed].softmax(-1), atol=1e-6)


def test_a_full_model_folder_is_served_as_it_is(tmp_path) -> None:
    from bbox_sft.serving import ServeArguments, VllmPlatform, prepare

    folder = tmp_path / "objects-run"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "bbox_sft_args.json").write_text(json.dumps({"task": "objects", "labels": ["car"]}))
    command, env, said = prepare(ServeArguments(adapter=[str(folder)]), VllmPlatform())
    assert command[4] == str(folder) and command[command.index("--served-model-name") + 1] == "objects-run"
    assert "--enable-lora" not in command and not (folder / "merged").exists()
    assert "served as it is" in said[0] and str(Path(__file__).resolve().parents[1]) in env["PYTHONPATH"]


def test_loras_on_a_merged_adapter_share_its_server_and_it_keeps_its_name(tmp_path) -> None:
    from bbox_sft.serving import ServeArguments, VllmPlatform, serve_command

    merged_dir = tmp_path / "vision" / "merged"
    vision = _adapter(tmp_path / "vision", "Qwen/Qwen3-VL-2B-Instruct", target_modules=LM, modules_to_save=["merger"])
    lm = _adapter(tmp_path / "lm", str(merged_dir), target_modules=LM)
    command = serve_command(ServeArguments(adapter=[str(vision), str(lm)]), merged={str(vision): str(merged_dir)},
                            platform=VllmPlatform())
    assert command[4] == str(merged_dir) and command[command.index("--served-model-name") + 1] == "vision"
    assert command[command.index("--lora-modules") + 1] == f"lm={lm.resolve()}"


def test_an_adapter_named_by_hub_id_is_fetched_as_predict_fetches_it() -> None:
    from bbox_sft.predict import AdapterError
    from bbox_sft.serving import ServeArguments, VllmPlatform, prepare

    with pytest.raises(AdapterError, match="nobody/no-such-adapter: no such local folder, and the Hub repo"):
        # offline here: the fetch is tried, and fails
        prepare(ServeArguments(adapter=["nobody/no-such-adapter"]), VllmPlatform())


def test_on_a_cpu_serve_defaults_to_float32_eager_and_a_kv_cache_sized_for_the_model(tiny_model_dir, tmp_path) -> None:
    """vLLM's CPU default reserves 92 % of RAM (and refuses to start when less is free) and serves bfloat16;
    serve asks for float32, eager mode and a KV cache of 4 sequences of max_model_len, computed here from the
    model's config by hand: keys and values of each layer, each KV head, each head dimension, 4 bytes."""
    from transformers import AutoConfig

    from bbox_sft.serving import PROCESSORS, ServeArguments, VllmPlatform, serve_command

    lora = _adapter(tmp_path / "lm", str(tiny_model_dir), target_modules=LM)
    command = serve_command(ServeArguments(adapter=[str(lora)], max_model_len=2048), platform=VllmPlatform("cpu",
                                                                                                            "v1"))
    options = dict(zip(command, command[1:]))
    text = AutoConfig.from_pretrained(tiny_model_dir).text_config
    per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * 4
    assert int(options["--kv-cache-memory-bytes"]) == 4 * 2048 * per_token
    assert options["--dtype"] == "float32" and "--enforce-eager" in command
    assert options["--logits-processors"] == PROCESSORS["v1"] and options["--max-loras"] == "1"
    chosen = serve_command(ServeArguments(adapter=[str(lora)], dtype="bfloat16", kv_cache_gib=0.5,
                                          enforce_eager=False), platform=VllmPlatform("cpu", "v1"))
    options = dict(zip(chosen, chosen[1:]))
    assert options["--dtype"] == "bfloat16" and options["--kv-cache-memory-bytes"] == str(2**29)
    assert "--enforce-eager" not in chosen  # what a user sets wins


def test_the_runner_is_pinned_and_the_key_stays_out_of_the_command_line(tmp_path) -> None:
    from bbox_sft.serving import ServeArguments, VllmPlatform, prepare

    lora = _adapter(tmp_path / "lm", "Qwen/Qwen3-VL-2B-Instruct", target_modules=LM)
    for runner in ("v1", "v2"):
        command, env, said = prepare(ServeArguments(adapter=[str(lora)], api_key="s3cret"),
                                     VllmPlatform("cuda", runner))
        assert env["VLLM_USE_V2_MODEL_RUNNER"] == ("1" if runner == "v2" else "0")
        assert env["VLLM_API_KEY"] == "s3cret" and not any("s3cret" in word for word in command + said)
        assert f"model runner {runner.upper()}" in " ".join(said)


def test_the_client_takes_the_url_serve_prints_or_the_openai_base() -> None:
    from bbox_sft.server_client import openai_base

    assert openai_base("http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert openai_base("http://127.0.0.1:8000/") == "http://127.0.0.1:8000/v1"
    assert openai_base("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"
    assert openai_base("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000/v1"
    assert openai_base("https://proxy.example/bbox/v1") == "https://proxy.example/bbox/v1"


def test_adapters_trained_at_different_pixel_budgets_are_refused_naming_them(tmp_path) -> None:
    """vLLM resizes every request with the server's one budget (per-request budgets only with
    --trust-request-mm-kwargs): serving a 64²..96² adapter beside a 128²..160² one would feed one of them images
    of a size it never trained on, so serve refuses, naming each adapter's budget."""
    import json as json_

    from bbox_sft.serving import ServeArguments, VllmPlatform, serve_command

    a = _adapter(tmp_path / "a", "Qwen/Qwen3-VL-2B-Instruct", target_modules=LM)
    b = _adapter(tmp_path / "b", "Qwen/Qwen3-VL-2B-Instruct", target_modules=LM)
    args = json_.loads((b / "bbox_sft_args.json").read_text())
    (b / "bbox_sft_args.json").write_text(json_.dumps({**args, "image_min_side": 64, "image_max_side": 96}))
    with pytest.raises(ValueError, match=r"one pixel budget.*'a': \(320, 448\), 'b': \(64, 96\)"):
        serve_command(ServeArguments(adapter=[str(a), str(b)]), platform=VllmPlatform())
    command = serve_command(ServeArguments(adapter=[str(a)]), platform=VllmPlatform())
    assert json_.loads(command[command.index("--mm-processor-kwargs") + 1]) == {"min_pixels": 320**2,
                                                                               "max_pixels": 448**2}
