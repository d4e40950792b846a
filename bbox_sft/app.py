"""``bbox-sft app``: a Gradio page that shows what a fine-tuned adapter finds, locally or as a Space.

    bbox-sft app                                   # the adapter `make demo` wrote (outputs/demo/lora)
    bbox-sft app --adapter outputs/run --port 7860
    python -m bbox_sft.app --adapter your-name/qwen3vl-bbox-lora --host 0.0.0.0

As a Hugging Face Space, ``app.py`` is two lines::

    from bbox_sft.app import create_app
    create_app("your-name/qwen3vl-bbox-lora").launch()

The model is loaded once into a :class:`~bbox_sft.predict.BoxPredictor` (the same code as
``bbox-sft predict``) and Gradio's queue serves one request at a time, in order. A file that is not
an image, an empty upload or an image the model cannot take gives a message in the page; the next
request is served as usual.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .data.synthetic import write_example_images
from .images import load_image
from .predict import AdapterError, BoxPredictor, ImageResult
from .visualize import draw_boxes

logger = logging.getLogger(__name__)

DEFAULT_ADAPTER = "outputs/demo/lora"
EXAMPLES_DIR = "outputs/app_examples"
BLUE = (40, 90, 230)
NO_ADAPTER = ("no adapter at {path}. Train one with `make demo` (about 8 minutes on a CPU; it writes "
              "outputs/demo/lora), or pass --adapter with your training output folder or a Hub repo id.")


@dataclass
class AppArguments:
    """Arguments of ``bbox-sft app``."""

    adapter: str | None = field(default=None, metadata={
        "help": f"Adapter folder or Hub repo id (default: {DEFAULT_ADAPTER}, written by `make demo`)."})
    base: str | None = field(default=None, metadata={"help": "Base model (default: the adapter's own)."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to serve on (0.0.0.0 for all)."})
    port: int = field(default=7860, metadata={"help": "Port to serve on."})
    examples_dir: str = field(default=EXAMPLES_DIR, metadata={
        "help": "Folder of example images; a few synthetic ones are written there if it has none."})
    batch_size: int = field(default=8, metadata={"help": "Images per generation batch (several-image tab)."})


def _label(result: ImageResult) -> str:
    return Path(result.path).name


def _line(result: ImageResult) -> dict:
    """The JSON line ``bbox-sft predict`` writes, named by the file's name rather than a server path."""
    return {**result.to_json(), "image": _label(result)}


def _error(result: ImageResult) -> str:
    """The reason a file was skipped, naming it as the user did (not by the server's upload path)."""
    return str(result.error).replace(result.path, _label(result))


def _answer(result: ImageResult, base: ImageResult | None) -> dict:
    """The JSON line, plus the base model's box under ``"base"`` when it was asked."""
    line = _line(result)
    if base is not None:
        line["base"] = {k: v for k, v in _line(base).items() if k in ("box", "box_px", "objects", "raw")}
    return line


def _describe(name: str, result: ImageResult, base: ImageResult | None) -> str:
    line = _line(result)
    if "objects" in line:  # a list task
        objects = line["objects"]
        listed = "no list in the answer" if objects is None else (
            f"{len(objects)} object(s)" + "".join(f"  \n- {o['label']}: {tuple(o['box_px'])} px" for o in objects))
        text = f"**{name}**" + (f" (asked for {result.query})" if result.query else "") + f": {listed}"
        if base is not None:
            theirs = _line(base)["objects"]
            text += f"  \nbase model (adapter off, blue): {'no list' if theirs is None else len(theirs)} object(s)"
        return text
    name += f" (asked for {result.query})" if result.query else ""
    if line["box"] is None:
        text = f"**{name}**: no box (unparsed answer `{line['raw']}`)"
    else:
        x0, y0, x1, y1 = line["box_px"]
        confidence = ("" if line["confidence"] is None
                      else f"; confidence {line['confidence']:.2f} (estimated P(IoU ≥ 0.5))")
        text = f"**{name}**: box ({x0}, {y0}) to ({x1}, {y1}) px in a {result.width}×{result.height} image{confidence}"
    if base is not None:
        base_px = _line(base)["box_px"]
        text += f"  \nbase model (adapter off, blue): {'no box' if base_px is None else tuple(base_px)}"
    return text


class BoxApp:
    """The page's handlers around one :class:`BoxPredictor` (plain Python: Gradio only calls them)."""

    def __init__(self, predictor: BoxPredictor) -> None:
        self.predictor = predictor
        self._downloads = tempfile.TemporaryDirectory(prefix="bbox_sft_app_")  # removed when the app exits
        self._served = 0

    def _query(self, query: str | None) -> str | None:
        """What a phrase or refer model is asked (None for the tasks that take none)."""
        task = self.predictor.task
        if not task.takes_query:
            return None
        if not (query or "").strip():
            raise ValueError(f"type the {task.query_label.lower()} (this model answers {task.title.lower()} "
                             "questions)")
        return query.strip()

    def _results(self, paths: list[str], compare_base: bool, query: str | None = None
                 ) -> list[tuple[ImageResult, ImageResult | None]]:
        if compare_base and not self.predictor.has_adapter:
            raise AdapterError("this model has no adapter to turn off, so there is no base box to show")
        query = self._query(query)
        mine = list(self.predictor.predict_files(paths, query=query))
        if not compare_base:
            return [(result, None) for result in mine]
        readable = [r.path for r in mine if r.error is None]
        theirs = iter(self.predictor.predict_files(readable, adapter=False, query=query))
        return [(result, None if result.error else next(theirs)) for result in mine]

    def _drawn(self, result: ImageResult, base: ImageResult | None) -> Image.Image:
        """The answer in red (labelled, for lists) over the base model's in blue."""
        task, image = self.predictor.task, load_image(result.path)
        if base is not None:
            answer = task.answer(base.prediction)
            boxes = [o.box for o in answer or []] if task.answers_list else [answer]
            image = draw_boxes(image, [(box, BLUE) for box in boxes])
        return task.draw(image, None, task.answer(result.prediction))

    def one(self, path: str | None, compare_base: bool = False, query: str | None = None
            ) -> tuple[Image.Image | None, str, str]:
        """One image -> (image with its box drawn, the JSON line, a sentence with pixels and confidence)."""
        if not path:
            return None, "", "**No image.** Upload, paste or drop an image, or pick an example below."
        try:
            [(result, base)] = self._results([path], compare_base, query)
        except Exception as error:  # the model could not take it: say so, keep serving
            logger.exception("%s: prediction failed", path)
            return None, "", f"**{Path(path).name}**: the model could not take this image ({error})."
        if result.error:
            return None, "", f"**{_label(result)} is not an image the app can read**: {_error(result)}"
        answer = json.dumps(_answer(result, base), indent=2)
        return self._drawn(result, base), answer, _describe(_label(result), result, base)

    def many(self, paths: list[str] | None, compare_base: bool = False, query: str | None = None
             ) -> tuple[list[tuple[Image.Image, str]], str | None, str]:
        """Several images -> (gallery of drawn boxes, a JSON lines file to download, a summary)."""
        if not paths:
            return [], None, "**No images.** Choose or drop several image files."
        try:
            results = self._results(list(paths), compare_base, query)
        except Exception as error:
            logger.exception("prediction failed")
            return [], None, f"**The model could not take these images** ({error})."
        gallery, skipped = [], []
        self._served += 1
        jsonl = Path(self._downloads.name) / f"boxes_{self._served}.jsonl"
        with open(jsonl, "w") as sink:
            for result, base in results:
                sink.write(json.dumps(_answer(result, base)) + "\n")
                if result.error:
                    skipped.append(f"{_label(result)} ({_error(result)})")
                    continue
                caption = _label(result)
                if result.prediction.confidence is not None:
                    caption += f" · {result.prediction.confidence:.2f}"
                gallery.append((self._drawn(result, base), caption))
        summary = f"**{len(gallery)} of {len(results)} image(s)** answered" + (" (base model in blue)." if
                                                                                   compare_base else ".")
        if skipped:
            summary += "  \nSkipped: " + "; ".join(skipped)
        return gallery, str(jsonl), summary


def _hand_over_unopened(image) -> None:
    """Make a ``gr.Image`` input pass an uploaded file's path on unopened (gradio would open it with PIL
    first and fail with its own error), so BoxPredictor's checks name what is wrong with the file.

    Set on the instance: subclassing a gradio component makes gradio write a ``.pyi`` beside this module.
    """
    opened = image.preprocess

    def preprocess(payload):
        if payload is not None and payload.path is not None and not (payload.url or "").startswith("data:"):
            return payload.path
        return opened(payload)  # pasted images arrive as data URLs: gradio writes them to a file

    image.preprocess = preprocess


def create_app(adapter: str | Path | BoxPredictor | None = None, base: str | None = None,
               examples: list[str | Path] | None = None, examples_dir: str | Path = EXAMPLES_DIR,
               batch_size: int = 8):
    """The Gradio Blocks page for an adapter (folder, Hub repo id or a loaded predictor); ``.launch()`` it."""
    import gradio as gr

    if isinstance(adapter, BoxPredictor):
        predictor = adapter
    else:
        adapter = adapter or DEFAULT_ADAPTER
        if adapter == DEFAULT_ADAPTER and not Path(adapter).is_dir():
            raise AdapterError(NO_ADAPTER.format(path=adapter))
        predictor = BoxPredictor.from_pretrained(adapter, base=base, batch_size=batch_size)
    if examples is None:
        examples = write_example_images(examples_dir)
    handlers = BoxApp(predictor)
    compare_note = "" if predictor.has_adapter else " (not available: this model has no adapter)"

    task = predictor.task
    with gr.Blocks(title=f"bbox-sft: {task.title.lower()}", analytics_enabled=False,
                   delete_cache=(3600, 86400)) as page:  # uploads are deleted after a day
        gr.Markdown(task.heading)
        compare = gr.Checkbox(label=f"Also show the base model's box, adapter off (blue){compare_note}",
                              value=False, interactive=predictor.has_adapter, elem_id="compare-base")
        with gr.Tab("One image"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"],
                                     image_mode=None, elem_id="image-in")
                    _hand_over_unopened(image)
                    query = gr.Textbox(label=task.query_label or "Query", value="", elem_id="query",
                                       visible=task.takes_query)
                    run_one = gr.Button("Find the box", variant="primary", elem_id="run-one")
                with gr.Column():
                    drawn = gr.Image(label="Box", type="pil", interactive=False, elem_id="image-out")
                    summary = gr.Markdown(elem_id="summary-one")
                    answer = gr.Code(label="JSON", language="json", interactive=False, elem_id="answer-json")
            gr.Examples([[str(p)] for p in examples], inputs=[image], label="Examples (synthetic)")
        with gr.Tab("Several images"):
            with gr.Row():
                with gr.Column():
                    files = gr.File(label="Images", file_count="multiple", type="filepath", elem_id="files-in")
                    run_many = gr.Button("Find the boxes", variant="primary", elem_id="run-many")
                with gr.Column():
                    summary_many = gr.Markdown(elem_id="summary-many")
                    gallery = gr.Gallery(label="Boxes", columns=3, elem_id="gallery")
                    jsonl = gr.File(label="JSON lines", elem_id="jsonl-out")
        one_outputs = [drawn, answer, summary]
        asked = [query] if task.takes_query else []  # phrase and refer models: the query is one more input
        run_one.click(handlers.one, [image, compare, *asked], one_outputs, api_name="predict_one")
        for changed in (image, compare):  # a new image or the switch flipped: answer at once
            changed.change(handlers.one, [image, compare, *asked], one_outputs, api_visibility="private")
        run_many.click(handlers.many, [files, compare, *asked], [gallery, jsonl, summary_many],
                       api_name="predict_many")
    page.queue(default_concurrency_limit=1)  # one model: requests are served one at a time, in order
    return page


def main(argv: list[str] | None = None) -> int:
    from transformers import HfArgumentParser

    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own start-up requests

    (args,) = HfArgumentParser(AppArguments, prog="bbox-sft app").parse_args_into_dataclasses(args=argv)
    page = create_app(args.adapter, base=args.base, examples_dir=args.examples_dir, batch_size=args.batch_size)
    page.launch(server_name=args.host, server_port=args.port, ssr_mode=False, footer_links=["api"])
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        sys.exit(main())
    except AdapterError as error:
        logger.error("error: %s", error)
        sys.exit(2)
