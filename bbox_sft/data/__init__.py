"""The data side: saliency masks on disk -> a ``datasets.DatasetDict`` of image + chat records."""

from .builder import FEATURES, SaliencyBoxes, SaliencyBoxesConfig
from .prepare import PrepareArguments, prepare_dataset
from .synthetic import write_synthetic_set

__all__ = [
    "FEATURES",
    "PrepareArguments",
    "SaliencyBoxes",
    "SaliencyBoxesConfig",
    "prepare_dataset",
    "write_synthetic_set",
]
