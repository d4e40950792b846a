"""The same ``predict`` through a vLLM server started by ``bbox-sft serve``: OpenAI chat requests, our answers.

    predictor = ServerPredictor.from_pretrained("outputs/run", server="http://127.0.0.1:8000/v1")
    for result in predictor.predict_files(paths):  # in input order, 8 requests in flight
        print(result.to_json())

What makes the answers the same as :class:`~bbox_sft.predict.BoxPredictor`'s:

- the image is prepared here exactly as the local path prepares it (:func:`~bbox_sft.images.open_image`:
  upright RGB, draft-decoded, shrunk to the processor's target; panoramas padded and their boxes mapped
  back) and sent losslessly as a PNG data URL, so vLLM's processor sees the pixels transformers sees;
- the grammar travels as ``vllm_xargs`` (:class:`~bbox_sft.grammar.spec.GrammarSpec`) and the server's
  logits processor builds the same automaton from it;
- ``spread``, ``confidence`` and the objects' scores are computed by the same functions as locally
  (:func:`~bbox_sft.decoding.scored_steps`, :func:`~bbox_sft.decoding.answer_of`) from the log-probabilities
  the server returns after the grammar's mask (``--logprobs-mode processed_logprobs``): the top 20 of
  each step hold every allowed digit, and their softmax is the model's distribution over them.

The request, for a client of your own (the plain ``openai`` client works; :func:`chat_request` builds it)::

    {"model": "<adapter folder name>", "temperature": 0, "max_tokens": 64,
     "messages": [{"role": "user", "content": [
         {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
         {"type": "text", "text": "<the task's instruction>"}]}],
     "vllm_xargs": {"bbox_format": "json"},  # list tasks add "bbox_labels": [...], "bbox_max_objects": N
     "logprobs": true, "top_logprobs": 20, "return_tokens_as_token_ids": true}  # only for spread/confidence
"""

from __future__ import annotations

import base64
import io
import logging
import math
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import repeat
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import torch
from PIL import Image

from .calibration import Calibration
from .decoding import Prediction, answer_of, scored_steps
from .grammar import TokenGrammar
from .grammar.spec import GrammarSpec
from .images import ImageError, open_image, pad_to_aspect_ratio, to_rgb
from .model import load_processor
from .predict import AdapterError, ImageResult, Predictor, adapter_base, resolve_adapter
from .tasks import Task, get_task

logger = logging.getLogger(__name__)
TOP_LOGPROBS = 20  # vLLM's default --max-logprobs: more than the 11 tokens a digit step allows
MASKED = -9999.0  # how vLLM's OpenAI server writes a log-probability of -inf


class ServerError(ConnectionError):
    """The server refused or failed a request (its HTTP status and message), or could not be reached."""


def openai_base(url: str) -> str:
    """The OpenAI base URL of a server: ``http://host:port`` (what ``bbox-sft serve`` prints) gains ``/v1``; a URL
    with a path (``.../v1``, or a proxy's own prefix) is kept as it is."""
    url = url.rstrip("/")
    return url + "/v1" if urlsplit(url).path in ("", "/") else url


def data_url(image: Image.Image) -> str:
    """``image`` as a lossless PNG data URL (a JPEG would change the pixels the model sees)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat_request(model: str, image_url: str, instruction: str, max_tokens: int, spec: GrammarSpec | None,
                 scores: bool = True) -> dict[str, Any]:
    """The OpenAI chat-completions body for one image: greedy, the grammar in ``vllm_xargs``, and with
    ``scores`` the post-mask log-probabilities (as token ids) that spread and confidence are computed from."""
    body: dict[str, Any] = {
        "model": model, "temperature": 0, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                  {"type": "text", "text": instruction}]}],
        "logprobs": True, "return_tokens_as_token_ids": True}
    if spec is not None:
        body["vllm_xargs"] = spec.to_args()
        if scores:
            body["top_logprobs"] = TOP_LOGPROBS
    return body


def _token_id(token: str) -> int:
    return int(token.removeprefix("token_id:"))


def step_scores(step: dict[str, Any], size: int, allowed: Sequence[int] = ()) -> torch.Tensor:
    """One step's returned log-probabilities as a score vector whose softmax over the ``allowed`` tokens is the
    model's: the listed tokens at their values, the rest at -inf. When more tokens were allowed than listed
    (a label chosen among more than 20 first tokens), the mass below the top 20 goes on one unlisted allowed
    token, so every listed token, the written one among them, keeps its exact probability."""
    listed: dict[int, float] = {}
    for entry in [*(step.get("top_logprobs") or []), step]:
        if entry["logprob"] > MASKED:
            listed[_token_id(entry["token"])] = float(entry["logprob"])
    scores = torch.full((size,), float("-inf"))
    for token, logprob in listed.items():
        scores[token] = logprob
    missing = [token for token in allowed if token not in listed]
    if missing:
        rest = 1.0 - sum(math.exp(v) for v in listed.values())
        scores[missing[0]] = math.log(max(rest, 1e-30))
    return scores


class ServerPredictor(Predictor):
    """A model served by ``bbox-sft serve`` (vLLM), asked over HTTP; the same results as :class:`BoxPredictor`.

    ``server``: one URL, or several servers of the same model (one per GPU or node) that share the work, each
    image going to one of them in turn. ``max_in_flight`` requests run at once on each (the server batches
    them); results come back in input order.
    """

    def __init__(self, server: str | Sequence[str], model: str, processor, task: str | Task = "subject",
                 answer_format: str = "json", constrained: bool = True, calibration: Calibration | None = None,
                 labels: Sequence[str] | None = None, max_objects: int | None = None, max_new_tokens: int | None = None,
                 max_in_flight: int = 8, timeout: float = 600.0, api_key: str | None = None) -> None:
        self.servers = [openai_base(url) for url in ([server] if isinstance(server, str) else server)]
        self.server, self.model = self.servers[0], model
        self.processor, self.task, self.answer_format = processor, get_task(task), answer_format
        self.constrained, self.calibration = constrained, calibration
        self.labels = list(labels) if labels is not None else None
        self.max_objects, self.max_new_tokens = max_objects, max_new_tokens
        self.max_in_flight = max_in_flight
        api_key = api_key or os.environ.get("OPENAI_API_KEY")  # as the openai client reads it
        self.clients = [httpx.Client(base_url=url, timeout=timeout, limits=httpx.Limits(
            max_connections=max_in_flight), headers={"Authorization": f"Bearer {api_key}"} if api_key else None)
            for url in self.servers]
        self.tokenizer = processor.tokenizer
        self.eos = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.grammars: dict[GrammarSpec, TokenGrammar] = {}
        bases = set()
        for k, url in enumerate(self.servers):
            served = self.served_models(k)
            if model not in served:
                raise AdapterError(f"{url} does not serve {model!r}; it serves {sorted(served)}")
            bases.add(served[model])
        if len(bases) > 1:
            raise AdapterError(f"the servers serve {model!r} on different bases {sorted(map(str, bases))}")
        self.base_model = bases.pop()  # the base a LoRA module sits on (None: a merged or full model)

    @classmethod
    def from_pretrained(cls, adapter: str | Path, server: str | Sequence[str], model: str | None = None,
                        **kwargs) -> ServerPredictor:
        """The adapter's run description, calibration and processor from its folder; the answers from ``server``
        (``model``: the name it is served under, by default the folder's name, as ``bbox-sft serve`` names it)."""
        adapter_dir = resolve_adapter(adapter)
        has_processor = (adapter_dir / "processor_config.json").is_file()
        processor = load_processor(str(adapter_dir if has_processor else adapter_base(adapter_dir) or adapter_dir))
        return cls(server, model or Path(adapter_dir).name, processor, **cls.saved_kwargs(adapter_dir, kwargs))

    def served_models(self, member: int = 0) -> dict[str, str | None]:
        """{served name: the base model it is a LoRA of, or None}, from a server's ``/models``."""
        try:
            response = self.clients[member].get("/models")
            response.raise_for_status()
        except httpx.HTTPError as error:
            hint = (" (the server wants an API key: --api_key, or OPENAI_API_KEY)"
                    if isinstance(error, httpx.HTTPStatusError) and error.response.status_code == 401 else "")
            raise ServerError(f"{self.servers[member]}: cannot list the served models ({error}){hint}") from error
        return {m["id"]: m.get("parent") for m in response.json()["data"]}

    @property
    def has_base(self) -> bool:
        return self.base_model is not None

    def _grammar(self, spec: GrammarSpec) -> TokenGrammar:
        if spec not in self.grammars:
            self.grammars[spec] = spec.build(self.tokenizer)
        return self.grammars[spec]

    def _post(self, body: dict[str, Any], member: int = 0) -> dict[str, Any]:
        server = self.servers[member]
        try:
            response = self.clients[member].post("/chat/completions", json=body)
        except httpx.HTTPError as error:
            raise ServerError(f"no answer from {server} ({type(error).__name__}: {error})") from error
        if response.status_code != 200:
            try:
                message = response.json().get("error", {}).get("message") or response.text
            except ValueError:
                message = response.text
            raise ServerError(f"HTTP {response.status_code} from {server}: {message}")
        return response.json()

    def answer(self, image: Image.Image, instruction: str, *, query: str | None = None, adapter: bool = True,
               constrained: bool | None = None, parse: Callable[[str], Any] | None = None,
               max_new_tokens: int | None = None, member: int = 0) -> Prediction:
        """One image (as :func:`open_image` gives it) asked ``instruction``: the prediction the local path makes."""
        constrained = self.constrained if constrained is None else constrained
        spec = self.task.grammar_spec(self.answer_format, self.labels, query, self.max_objects)
        grammar = self._grammar(spec) if constrained and spec is not None else None
        # as generate_answers: the task's budget for its grammar (a list gets its grammar's, constrained or not)
        budget = max_new_tokens or self.max_new_tokens or self.task.token_budget(
            self._grammar(spec) if spec is not None else None)
        fitted, letterbox = pad_to_aspect_ratio(image)
        model = self.model if adapter else self.base_model
        if model is None:
            raise AdapterError(f"{self.model} is served merged: the server has no base model to ask")
        body = chat_request(model, data_url(to_rgb(fitted)), instruction, budget,
                            spec if grammar is not None else None)
        choice = self._post(body, member % len(self.clients))["choices"][0]
        steps = (choice.get("logprobs") or {}).get("content") or []
        ids = [_token_id(s["token"]) for s in steps]
        if choice.get("finish_reason") == "stop" and (not ids or ids[-1] != self.eos):
            ids.append(self.eos)  # vLLM leaves the stop token out of the listed steps
        raw = self.tokenizer.decode(ids, skip_special_tokens=True) if ids else choice["message"]["content"] or ""
        choices, decisions = [], {}
        if grammar is not None and steps:
            size = max(len(self.tokenizer), max(ids) + 1)
            scores = [step_scores(s, size, grammar.allowed(ids[:t])) for t, s in enumerate(steps)]
            choices, decisions = scored_steps(grammar, ids, scores)
        calibration = self.calibration if adapter and self.task.calibrates else None
        return answer_of(raw, ids, choices, decisions, grammar, letterbox, parse or self.task.parse,
                         self.answer_format, calibration)

    def predict(self, images: Sequence[Image.Image], progress: bool = False, adapter: bool = True,
                query: str | Sequence[str | None] | None = None) -> list[Prediction]:
        queries = self._queries(images, query)
        with ThreadPoolExecutor(self.max_in_flight * len(self.clients)) as pool:
            return list(pool.map(lambda k, image, q: self.answer(image, self.task.instruction(q), query=q,
                                                                 adapter=adapter, member=k),
                                 range(len(images)), images, queries))

    def native(self, images, instructions, parse, max_new_tokens) -> list[Prediction]:
        adapter = not self.has_base  # a merged or full model is asked itself, as BoxPredictor does
        with ThreadPoolExecutor(self.max_in_flight * len(self.clients)) as pool:
            return list(pool.map(lambda k, image, text: self.answer(image, text, adapter=adapter, constrained=False,
                                                                    parse=parse, max_new_tokens=max_new_tokens,
                                                                    member=k),
                                 range(len(images)), images, instructions))

    def _file(self, path: str, query: str | None, adapter: bool, member: int = 0) -> ImageResult:
        try:
            image, (width, height) = open_image(path, self.processor)
            prediction = self.answer(image, self.task.instruction(query), query=query, adapter=adapter, member=member)
        except (ImageError, ServerError) as error:
            logger.error("%s: %s", path, error)
            reason = error.reason if isinstance(error, ImageError) else "server_refused"
            return ImageResult(path, None, error=str(error), reason=reason, query=query, task=self.task)
        return ImageResult(path, prediction, width, height, query=query, task=self.task)

    def predict_files(self, paths: Iterable[str | Path], window: int | None = None, adapter: bool = True,
                      query: str | Sequence[str | None] | None = None) -> Iterator[ImageResult]:
        """Results for image files in input order, ``max_in_flight`` requests at a time on each server (the k-th file
        to server k mod n), at most ``window`` (default: twice that) prepared and waiting, so a folder of any size
        streams. A file that cannot be read, or that the server refuses, gets a result with its error; the rest go
        on."""
        in_flight = self.max_in_flight * len(self.clients)
        window = window or 2 * in_flight
        queries = iter(query) if isinstance(query, (list, tuple)) else repeat(query)
        pending: deque = deque()
        with ThreadPoolExecutor(in_flight) as pool:
            for k, path in enumerate(paths):
                q = next(queries)
                self.task.check_query(q)
                pending.append(pool.submit(self._file, str(path), q, adapter, k % len(self.clients)))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
