"""The data side: saliency masks, detection annotations or referring expressions on disk -> a
``datasets.DatasetDict`` of image + chat records, written by each task (:mod:`bbox_sft.tasks`)."""

from .builder import FEATURES, SaliencyBoxes, SaliencyBoxesConfig
from .detection_builder import DetectionBoxes, DetectionBoxesConfig
from .prepare import PrepareArguments, prepare_dataset
from .refer import ReferBoxes, ReferBoxesConfig
from .synthetic import write_synthetic_set

__all__ = [
    "FEATURES",
    "DetectionBoxes",
    "DetectionBoxesConfig",
    "PrepareArguments",
    "ReferBoxes",
    "ReferBoxesConfig",
    "SaliencyBoxes",
    "SaliencyBoxesConfig",
    "prepare_dataset",
    "write_synthetic_set",
]
