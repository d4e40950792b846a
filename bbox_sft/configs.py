"""The recipe fields of ours; everything else in a recipe is TRL's ``SFTConfig`` or ``ModelConfig``."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import ScriptArguments


@dataclass
class BoxScriptArguments(ScriptArguments):
    """Task, data, answer format, pixel budget and freezing for box fine-tuning.

    ``dataset_name`` is a prepared dataset folder (``bbox-sft prepare`` output) or a Hub dataset id.
    With ``data_dir``, a missing ``dataset_name`` folder is built from that images + masks folder first.
    """

    dataset_test_split: str = field(default="validation", metadata={"help": "Split evaluated during training."})
    data_dir: str | None = field(
        default=None, metadata={"help": "Images + masks (DUTS layout or images/ + masks/) to build dataset_name from."}
    )
    synthetic_images: int = field(
        default=0, metadata={"help": "If > 0 and data_dir is missing, write this many synthetic images there first."}
    )
    synthetic_domain: str = field(default="plain", metadata={"help": "plain | cluttered (synthetic sets only)."})
    synthetic_seed: int = field(default=0, metadata={"help": "Seed of the synthetic set."})
    train_size: int = field(default=2000, metadata={"help": "Train images when building the dataset."})
    val_size: int = field(default=500, metadata={"help": "Validation images when building the dataset."})
    test_size: int = field(default=500, metadata={"help": "Test images when building the dataset."})
    box_mode: str = field(default="largest", metadata={"help": "largest | union | components"})
    max_objects: int | None = field(default=None, metadata={
        "help": "objects, phrase, when building the dataset: the most boxes an answer holds (an image with more "
                "keeps its largest, the others counted as lost). Default: no limit."})
    answer_format: str = field(default="json", metadata={"help": "json | qwen (Qwen-VL's bbox_2d on a 0-1000 grid)."})
    task: str = field(default="subject", metadata={
        "help": "subject (one box, from saliency masks) | objects (every object) | phrase (the objects a prompt "
                "names), both from a detection export in data_dir (COCO, YOLO, VOC, datasets) | refer (the object a "
                "description picks out, from "
                "referring expressions); must match the records of dataset_name."})
    image_min_side: int = field(default=320, metadata={"help": "Pixel budget: images hold at least this side² pixels."})
    image_max_side: int = field(default=448, metadata={"help": "Pixel budget: images hold at most this side² pixels."})
    train_vision_tower: bool = field(
        default=False, metadata={"help": "Train the vision tower (LoRA on its blocks, or fully without peft)."}
    )
    train_merger: bool = field(
        default=False, metadata={"help": "Train the vision-language merger (projector) fully."}
    )
    box_eval_samples: int = field(
        default=64, metadata={"help": "Validation images generated at each evaluation for the box metrics (0: all)."}
    )
    constrained_decoding: bool = field(
        default=True, metadata={"help": "Force the answer format while generating (parse rate 1.0)."}
    )
    calibrate_confidence: bool = field(
        default=True,
        metadata={"help": "After training, fit P(IoU >= 0.5) from the digit distributions on the validation "
                          "split; saved as box_confidence.json beside the model (needs constrained decoding)."},
    )
    callbacks: list[str] = field(
        default_factory=list, metadata={"help": "Callbacks by name: early_stopping."}
    )
    early_stopping_patience: int = field(default=3, metadata={"help": "Evaluations without improvement."})
    merge_adapter: bool = field(default=False, metadata={
        "help": "Where model_name_or_path is an adapter (an earlier run): merge it into its base and train a fresh "
                "LoRA (the recipe's lora_* fields) on the merged model, instead of training it further (its own rank "
                "and targets)."})
    max_train_seconds: float | None = field(default=None, metadata={
        "help": "Stop training after this many seconds (evaluations included), saving and evaluating that step: "
                "two methods compared for the same budget. Default: no limit (max_steps or epochs decide)."})
    build_tiny_model: bool = field(
        default=False,
        metadata={"help": "If model_name_or_path is a missing local folder, build a tiny random Qwen3-VL there."},
    )
    tiny_hidden_size: int = field(default=256, metadata={"help": "Hidden size of a tiny model built here."})
    tiny_layers: int = field(default=4, metadata={"help": "Decoder layers of a tiny model built here."})


@dataclass
class BoxGRPOArguments(BoxScriptArguments):
    """The GRPO stage's fields: ``model_name_or_path`` (``ModelConfig``) is the SFT run to start from (an adapter
    folder or Hub id) or a base model; the answer's task, format and pixel budget default to that run's, since
    the rollouts must be answers as the run learnt to write them."""

    task: str | None = field(default=None, metadata={
        "help": "subject | objects | phrase | refer. Default: the SFT run's (subject from a base model)."})
    answer_format: str | None = field(default=None, metadata={
        "help": "json | qwen. Default: the SFT run's (json from a base model)."})
    image_min_side: int | None = field(default=None, metadata={"help": "Pixel budget. Default: the SFT run's (320)."})
    image_max_side: int | None = field(default=None, metadata={"help": "Pixel budget. Default: the SFT run's (448)."})
    reward_bonus: float = field(default=0.0, metadata={
        "help": "Added to the reward of a hit (IoU >= 0.5; for lists, per matched box, shared as the IoU is)."})
