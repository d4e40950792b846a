"""Finding image/mask pairs on disk: the DUTS layout as users download it, and any images/ + masks/ pair.

Recognised below a data folder (at any depth, after archives are extracted):

- DUTS: ``<name>-Image/`` beside ``<name>-Mask/`` (``DUTS-TR/DUTS-TR-Image`` + ``DUTS-TR/DUTS-TR-Mask``,
  likewise ``DUTS-TE``); a source whose name ends in ``-TE`` is a test set;
- any saliency set: ``images/`` beside ``masks/`` (MSRA-B, DUT-OMRON, ECSSD or your own, once their
  folders carry these names), pairs matched by file stem.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}
MASK_SUFFIXES = {".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff", ".gif"}
ARCHIVE_NAMES = ("DUTS-TR.zip", "DUTS-TE.zip")

DOWNLOAD_HELP = """\
Where to get saliency data (download by hand; check each set's terms of use):

  DUTS (10,553 train + 5,019 test images, Wang et al., CVPR 2017)
      http://saliencydetection.net/duts/  ->  DUTS-TR.zip and DUTS-TE.zip
      Put the archives (or their extracted folders) in one folder:
          D/DUTS-TR.zip                       or  D/DUTS-TR/DUTS-TR-Image/*.jpg
          D/DUTS-TE.zip                           D/DUTS-TR/DUTS-TR-Mask/*.png
                                                  D/DUTS-TE/DUTS-TE-Image/*.jpg ...
      DUTS-TE becomes the test split; train and validation come from DUTS-TR.

  MSRA-B (5,000 images, Liu et al., CVPR 2007 / Jiang et al., CVPR 2013)
      https://mmcheng.net/msra10k/  (MSRA-B and MSRA10K with pixel masks)
  DUT-OMRON (5,168 images, Yang et al., CVPR 2013)
      http://saliencydetection.net/dut-omron/
      For these and any other set, arrange the files as
          D/<set>/images/<stem>.jpg
          D/<set>/masks/<stem>.png            (matched by file stem)

Then: bbox-sft prepare --data_dir D --output_dir data/saliency
"""


@dataclass(frozen=True)
class Pair:
    """One image and its mask (``mask`` is None where no mask with the image's stem exists)."""

    image_id: str
    image: str
    mask: str | None
    source: str

    @property
    def is_test_source(self) -> bool:
        return self.source.upper().endswith("-TE")


@dataclass(frozen=True)
class Orphan:
    """A mask with no image: reported, never silently dropped."""

    mask: str
    source: str


def _by_stem(folder: Path, suffixes: set[str]) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        # a dangling link is kept, so the build names it instead of losing it without a word
        if (path.is_file() or path.is_symlink()) and path.suffix.lower() in suffixes and not path.name.startswith("."):
            files.setdefault(path.stem, path)
    return files


def _image_mask_dirs(root: Path) -> list[tuple[str, Path, Path]]:
    """(source name, image folder, mask folder) for every recognised layout below ``root``."""
    found = []
    for image_dir in sorted(p for p in root.rglob("*") if p.is_dir()):
        name = image_dir.name
        if name.endswith("-Image"):
            mask_dir = image_dir.with_name(name[: -len("-Image")] + "-Mask")
            source = name[: -len("-Image")]
        elif name.lower() == "images":
            candidates = (image_dir.with_name(n) for n in ("masks", "Masks"))
            mask_dir = next((d for d in candidates if d.is_dir()), None)
            source = image_dir.parent.name
        else:
            continue
        if mask_dir is not None and mask_dir.is_dir():
            found.append((source, image_dir, mask_dir))
    return found


def find_pairs(roots: list[str | Path]) -> tuple[list[Pair], list[Orphan]]:
    """Every image below ``roots`` with its mask, sorted by id; a source seen twice is read once.

    The same source may be both an extracted folder and an archive: the first root wins, and ids
    seen in an earlier source are not read again.
    """
    pairs: list[Pair] = []
    orphans: list[Orphan] = []
    seen_sources: set[str] = set()
    seen_ids: set[str] = set()
    for root in roots:
        for source, image_dir, mask_dir in _image_mask_dirs(Path(root)):
            if source in seen_sources:
                logger.info("%s: source %s already read, skipped", image_dir, source)
                continue
            seen_sources.add(source)
            images = _by_stem(image_dir, IMAGE_SUFFIXES)
            masks = _by_stem(mask_dir, MASK_SUFFIXES)
            for stem, image in images.items():
                if stem in seen_ids:
                    continue
                seen_ids.add(stem)
                mask = masks.get(stem)
                pairs.append(Pair(stem, str(image), str(mask) if mask else None, source))
            orphans.extend(Orphan(str(masks[s]), source) for s in sorted(set(masks) - set(images)))
    pairs.sort(key=lambda p: p.image_id)
    return pairs, orphans


def find_archives(data_dir: str | Path) -> list[Path]:
    """DUTS archives in ``data_dir`` whose extracted folder is not already there."""
    data_dir = Path(data_dir)
    return [
        data_dir / name
        for name in ARCHIVE_NAMES
        if (data_dir / name).is_file() and not (data_dir / name.removesuffix(".zip")).is_dir()
    ]


def is_dataset_folder(data_dir: str | Path) -> bool:
    """Whether ``data_dir`` holds a dataset written by ``save_to_disk``."""
    path = Path(data_dir)
    return (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file()


def is_dataset_source(data_dir: str | Path) -> bool:
    """Whether ``data_dir`` names a ``datasets`` set: a ``save_to_disk`` folder, or (no such local path) a Hub
    id ``owner/name`` (it counts offline too: loading it then says what is wrong)."""
    return is_dataset_folder(data_dir) or (not Path(data_dir).exists() and str(data_dir).count("/") == 1)


def load_dataset_source(source: str):
    """The ``datasets`` set ``source`` names (:func:`is_dataset_source`): ``load_from_disk`` or ``load_dataset``."""
    import datasets

    return datasets.load_from_disk(source) if is_dataset_folder(source) else datasets.load_dataset(source)
