"""Train / validation / test assignment by a stable hash of each image id.

An image's split depends only on its id and the seed, never on which other images exist, so
adding images to a set never moves an existing image to another split. Each split is then the
first ``size`` images of its pool in hash order, so the selection is deterministic too.
"""

from __future__ import annotations

import hashlib

SPLITS = ("train", "validation", "test")
# what sources name their splits, in our names; other names (RefCOCO's testA, testB) are kept as they are
SPLIT_NAMES = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation",
               "dev": "validation", "test": "test"}


def split_name(name: str) -> str:
    """A source's split name in ours: val / valid / validation / dev -> validation; train; test; others as named."""
    return SPLIT_NAMES.get(name.lower(), name)


def all_splits(names) -> list[str]:
    """Our three splits, then any other a source has (RefCOCO's testA, testB), in the source's order."""
    return [*SPLITS, *dict.fromkeys(n for n in names if n is not None and n not in SPLITS)]


def size_of(split: str, sizes: dict[str, int]) -> int:
    """The size option that cuts ``split``: its own, and the test size for other evaluation splits (testA)."""
    return sizes.get(split, sizes["test"])


def hash_unit(image_id: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by ``image_id`` and ``seed`` (not Python's salted ``hash``)."""
    digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(
    image_ids: list[str],
    sizes: dict[str, int],
    seed: int = 42,
    test_ids: list[str] | None = None,
) -> dict[str, list[str]]:
    """Split ids into ``train`` / ``validation`` / ``test`` of at most ``sizes[split]`` each.

    Pools are hash ranges with the requested proportions. With ``test_ids`` (a set that ships its
    own test images, like DUTS-TE), ``test`` is drawn from those and the other two from
    ``image_ids``.
    """
    keyed = sorted((hash_unit(i, seed), i) for i in image_ids)
    pools: dict[str, list[str]] = {split: [] for split in SPLITS}
    if test_ids is not None:
        pools["test"] = [i for _, i in sorted((hash_unit(i, seed), i) for i in test_ids)]
        shares = {"train": sizes["train"], "validation": sizes["validation"]}
    else:
        shares = {split: sizes[split] for split in SPLITS}
    if any(size < 0 for size in sizes.values()):
        raise ValueError(f"split sizes cannot be negative, got {sizes}")
    total = sum(shares.values())
    if total == 0 and not pools["test"]:
        raise ValueError(f"every split size is 0, got {sizes}: nothing to build")
    if total == 0:  # an evaluation-only set: only the shipped test images are wanted
        return {split: pools[split][: sizes[split]] for split in SPLITS}
    bounds, edge = [], 0.0
    for split in ("validation", "test", "train"):  # small splits first: their pools hold still
        if split in shares:
            edge += shares[split] / total
            bounds.append((edge, split))
    for unit, image_id in keyed:
        split = next(s for b, s in bounds if unit < b or b == bounds[-1][0])
        pools[split].append(image_id)
    return {split: pools[split][: sizes[split]] for split in SPLITS}
