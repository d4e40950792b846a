"""The ``bbox-sft`` command: one sub-command per stage, each a dataclass parsed by ``HfArgumentParser``.

    bbox-sft train    recipes/qwen3vl_lora.yaml [--field value ...]
    bbox-sft synth    --output_dir data/synth --n 300 [--task objects|refer]
    bbox-sft prepare  --data_dir data/synth --output_dir data/saliency [--visualize]
    bbox-sft prepare  --download_help
    bbox-sft eval     --adapter outputs/run --dataset data/saliency --split test --output_dir outputs/eval
    bbox-sft predict  --adapter outputs/run --image photo.jpg [--output boxed.png] [--query "the red star"]
    bbox-sft predict  --adapter outputs/run --dir photos/ --server http://127.0.0.1:8000/v1
    bbox-sft label    --adapter outputs/run --dir photos/ --output labelled/ --format yolo [--resume]
    bbox-sft merge    --adapter outputs/run --output outputs/merged
    bbox-sft serve    --adapter outputs/run [--port 8000] [--tensor_parallel_size 2]
    bbox-sft push     --adapter outputs/run --repo_id your-name/qwen3vl-bbox-lora
    bbox-sft app      [--adapter outputs/run] [--port 7860]
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from .hub import HubPushError

logger = logging.getLogger("bbox_sft")


def parse(arguments: type, argv: list[str], command: str):
    """``argv`` as one dataclass of arguments (``--help`` prints every field and exits 0)."""
    (args,) = HfArgumentParser(arguments, prog=f"bbox-sft {command}").parse_args_into_dataclasses(args=argv)
    return args


@dataclass
class SynthArguments:
    """Arguments of ``bbox-sft synth``."""

    output_dir: str = field(metadata={"help": "Folder to write DUTS-TR/DUTS-TR-Image and -Mask into."})
    n: int = field(default=300, metadata={"help": "Number of images."})
    seed: int = field(default=0, metadata={"help": "Random seed."})
    domain: str = field(default="plain", metadata={"help": "plain | cluttered"})
    task: str = field(default="subject", metadata={
        "help": "the data layout of this task: subject, images + masks (DUTS layout); objects or phrase, images "
                "with several named shapes + a COCO instances file (images/ + annotations.json); refer, images with "
                "two or more shapes + refs.jsonl, an expression per shape"})
    min_objects: int | None = field(default=None, metadata={
        "help": "objects: fewest shapes per image (default 0: some have none; refer: 2)."})
    max_objects: int | None = field(default=None, metadata={"help": "most shapes per image (default 4; refer: 3)."})
    min_size: float | None = field(default=None, metadata={
        "help": "smallest half-size of a shape, as a fraction of the image side (default 0.08; refer: 0.14)."})
    max_size: float | None = field(default=None, metadata={"help": "largest half-size of a shape (default 0.22; "
                                                                   "refer: 0.3)."})


def _synth(argv: list[str]) -> int:
    from .data.synthetic import write_synthetic
    from .tasks import get_task

    args = parse(SynthArguments, argv, "synth")
    sizes = (args.min_size, args.max_size)
    if (None in sizes) != (sizes == (None, None)):
        raise ValueError("give both --min_size and --max_size, or neither")
    root = write_synthetic(get_task(args.task).sources, args.output_dir, n=args.n, seed=args.seed,
                           domain=args.domain, max_objects=args.max_objects, min_objects=args.min_objects,
                           scale=None if None in sizes else sizes)
    logger.info("wrote %d synthetic images for the %s task under %s", args.n, args.task, root)
    return 0


def _prepare(argv: list[str]) -> int:
    from .data.prepare import PrepareArguments, prepare_dataset
    from .data.sources import DOWNLOAD_HELP

    if "--download_help" in argv:
        sys.stdout.write(DOWNLOAD_HELP)
        return 0
    args = parse(PrepareArguments, argv, "prepare")
    prepare_dataset(args)
    return 0


@dataclass
class PredictArguments:
    """Arguments of ``bbox-sft predict``."""

    adapter: str = field(metadata={"help": "Adapter (or full model) folder written by training."})
    image: str | None = field(default=None, metadata={"help": "One image."})
    dir: str | None = field(default=None, metadata={"help": "A folder of images."})
    output: str | None = field(default=None, metadata={"help": "Draw the box: a PNG path (--image) or folder (--dir)."})
    base: str | None = field(default=None, metadata={"help": "Base model (default: the adapter's own)."})
    batch_size: int = field(default=8, metadata={"help": "Images per generation batch."})
    constrained: bool = field(default=True, metadata={"help": "Constrained decoding (parse rate 1.0)."})
    query: str | None = field(default=None, metadata={
        "help": "phrase models: the category to find; refer models: the description of the object."})
    queries: str | None = field(default=None, metadata={
        "help": "A JSON-lines file of {\"image\": path, \"query\" (or \"expression\"): text}: one question per "
                "image (refer, phrase), instead of --image / --dir and --query; paths relative to the file."})
    format: str = field(default="jsonl", metadata={
        "help": "jsonl: one JSON line per image; coco: objects/phrase models, a COCO results JSON array whose "
                "image and category ids come from --coco_annotations"})
    coco_annotations: str | None = field(default=None, metadata={
        "help": "--format coco: the COCO instances file the images belong to (ids by file name and category name)."})
    server: str | None = field(default=None, metadata={
        "help": "Ask a vLLM server started by `bbox-sft serve` (the URL it prints, http://127.0.0.1:8000, or its "
                "OpenAI base .../v1) instead of loading the model here: the same answers, the adapter folder still "
                "gives the task and calibration."})
    model_name: str | None = field(default=None, metadata={
        "help": "--server: the name the adapter is served under (default: the adapter folder's name)."})
    max_in_flight: int = field(default=8, metadata={"help": "--server: requests sent at once."})
    api_key: str | None = field(default=None, metadata={
        "help": "--server: the key the server was started with (default: OPENAI_API_KEY)."})


def _predict(argv: list[str]) -> int:
    import json
    from pathlib import Path

    from tqdm.auto import tqdm

    from .images import load_image
    from .predict import BoxPredictor, CocoResults, image_files, read_queries

    args = parse(PredictArguments, argv, "predict")
    if sum(a is not None for a in (args.image, args.dir, args.queries)) != 1:
        raise ValueError("give exactly one of --image PATH, --dir DIR or --queries FILE.jsonl")
    if args.queries is not None and args.query is not None:
        raise ValueError("--queries gives each image its own question: leave out --query")
    if args.format not in ("jsonl", "coco"):
        raise ValueError(f"--format must be jsonl or coco, got {args.format!r}")
    coco = CocoResults(args.coco_annotations) if args.format == "coco" else None
    if args.dir is not None and not Path(args.dir).is_dir():
        raise FileNotFoundError(f"--dir {args.dir} is not a folder")
    query: str | list[str] | None = args.query
    if args.queries is not None:
        paths, query = read_queries(args.queries)
    else:
        paths = [Path(args.image)] if args.image else list(image_files(args.dir))
    if args.server is not None:
        from .server_client import ServerPredictor

        predictor = ServerPredictor.from_pretrained(args.adapter, args.server, model=args.model_name,
                                                    constrained=args.constrained, max_in_flight=args.max_in_flight,
                                                    api_key=args.api_key)
    else:
        predictor = BoxPredictor.from_pretrained(args.adapter, base=args.base, constrained=args.constrained,
                                                 batch_size=args.batch_size)
    task = predictor.task
    if coco is not None and not task.answers_list:
        raise ValueError(f"--format coco is for objects and phrase models (this {task.name} model answers one box)")
    failed, boxes = [], 0
    # one JSON line per image, written as each window of batches is done: an interrupted run keeps them
    for result in tqdm(predictor.predict_files(paths, query=query), total=len(paths), desc="Predicting",
                       unit="image", disable=len(paths) <= args.batch_size):
        if coco is None:
            sys.stdout.write(json.dumps(result.to_json()) + "\n")
            sys.stdout.flush()
        if result.error:
            failed.append(result.path)
            continue
        if coco is not None:
            coco.add(result)
        answer = task.answer(result.prediction)
        boxes += len(answer) if isinstance(answer, list) else answer is not None
        if args.output:
            target = Path(args.output) if args.image else Path(args.output) / f"{Path(result.path).stem}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            task.draw(load_image(result.path), None, answer).save(target)
    if coco is not None:
        sys.stdout.write(json.dumps(coco.results) + "\n")
        if coco.unknown:
            left_out = ", ".join(f"{n} {why}" for why, n in coco.unknown.items())
            logger.warning("left out of the COCO results: %s", left_out)
    logger.info("%d image(s), %d boxes, %d skipped%s", len(paths), boxes, len(failed),
                f": {', '.join(failed)}" if failed else "")
    return 1 if failed else 0


def _label(argv: list[str]) -> int:
    from .labelling import LabelArguments, label_folder

    report = label_folder(parse(LabelArguments, argv, "label"))
    return 1 if report["unreadable"] else 0


def _eval(argv: list[str]) -> int:
    from .evaluation import EvalArguments, evaluate_adapter

    args = parse(EvalArguments, argv, "eval")
    evaluate_adapter(args)
    return 0


@dataclass
class MergeArguments:
    """Arguments of ``bbox-sft merge``."""

    adapter: str = field(metadata={"help": "Adapter folder written by training."})
    output: str = field(metadata={"help": "Folder for the merged model (loads without peft)."})
    base: str | None = field(default=None, metadata={"help": "Base model (default: the adapter's own)."})


def _merge(argv: list[str]) -> int:
    from .predict import merge_adapter

    args = parse(MergeArguments, argv, "merge")
    merge_adapter(args.adapter, args.output, args.base)
    return 0


def _serve(argv: list[str]) -> int:
    from .serving import ServeArguments, serve

    args = parse(ServeArguments, argv, "serve")
    return serve(args)


@dataclass
class PushArguments:
    """Arguments of ``bbox-sft push``."""

    adapter: str = field(metadata={"help": "Adapter folder (with its README.md model card)."})
    repo_id: str = field(metadata={"help": "Hub model repo id, e.g. your-name/qwen3vl-bbox-lora."})
    private: bool = field(default=False, metadata={"help": "Create the repo as private."})


def _push(argv: list[str]) -> int:
    from pathlib import Path

    from .hub import push_folder

    args = parse(PushArguments, argv, "push")
    folder = Path(args.adapter)
    if not (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{args.adapter}: not an adapter or model folder")
    push_folder(args.adapter, args.repo_id, private=args.private)
    return 0


def _launch(script: str, argv: list[str]) -> int:
    """``bbox-sft train|grpo [accelerate options] RECIPE.yaml [--field value ...]``: ``bbox_sft/<script>.py`` under
    ``accelerate launch``.

    Everything before the recipe goes to ``accelerate launch`` (``--config_file``, ``--num_processes``,
    ``--cpu`` ...), everything after it to the training script, as TRL's ``trl sft`` does.
    """
    from importlib import import_module
    from pathlib import Path

    from accelerate.commands.launch import launch_command, launch_command_parser

    usage = f"bbox-sft {script} [accelerate launch options] RECIPE.yaml [--field value ...]"
    recipe = next((i for i, a in enumerate(argv) if a.endswith((".yaml", ".yml")) and not
                   (i and argv[i - 1] == "--config_file")), None)
    if recipe is None and any(a in ("-h", "--help") for a in argv):
        sys.stdout.write(f"{usage}\n\nOptions before the recipe go to `accelerate launch` (see `accelerate "
                         "launch --help`); the recipe's fields, each also an option after it:\n\n")
        sys.stdout.flush()
        # TRL's parser lists the three dataclasses' fields, exits 0
        import_module(f".{script}", __package__).parse_args(["--help"], prog=f"bbox-sft {script}")
    if recipe is None:
        raise ValueError(f"usage: {usage}")
    if not Path(argv[recipe]).is_file():
        raise FileNotFoundError(f"recipe {argv[recipe]} does not exist")
    path = str(Path(__file__).with_name(f"{script}.py"))
    launch_command(launch_command_parser().parse_args([*argv[:recipe], path, *argv[recipe:]]))
    return 0


def _train(argv: list[str]) -> int:
    return _launch("train", argv)


def _grpo(argv: list[str]) -> int:
    return _launch("grpo", argv)


def _app(argv: list[str]) -> int:
    try:
        from .app import main as app_main
    except ImportError as error:  # gradio is the `app` extra
        raise ValueError(f"the app needs gradio: pip install -e '.[app]' ({error})") from error
    return app_main(argv)


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "train": (_train, "train with a recipe under accelerate launch (same as accelerate launch bbox_sft/train.py)"),
    "grpo": (_grpo, "GRPO after SFT on the task's reward, every rollout inside the grammar (bbox_sft/grpo.py)"),
    "synth": (_synth, "write a synthetic set in a task's data layout (DUTS, COCO, referring expressions)"),
    "prepare": (_prepare, "build the box dataset of a task from masks, COCO annotations or referring expressions"),
    "eval": (_eval, "score an adapter, its base model and the center prior on a split"),
    "predict": (_predict, "boxes for an image or a folder of images"),
    "label": (_label, "label a folder: a COCO, YOLO, VOC or datasets export, resumable, with a review set"),
    "merge": (_merge, "merge an adapter into its base model"),
    "serve": (_serve, "vLLM's OpenAI server for adapters, with the answer grammar (in vLLM's own environment)"),
    "push": (_push, "push an adapter folder (with its model card) to the Hub"),
    "app": (_app, "a web page (Gradio) that shows the adapter's boxes on your images"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<9} {help_}" for name, (_, help_) in COMMANDS.items()]
        sys.stdout.write("usage: bbox-sft <command> [--help]\n\ncommands:\n" + "\n".join(lines) + "\n")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    command, _ = COMMANDS[argv[0]]
    try:
        return command(argv[1:])
    except HubPushError as error:
        logger.error(str(error))
        return 1
    except (FileNotFoundError, ValueError, OSError) as error:
        logger.error("error: %s", error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
