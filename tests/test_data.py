"""The dataset builder end to end: synthetic DUTS folders and zips, bad input, splits, the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import cv2
import datasets
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from bbox_sft.boxes import mask_to_box
from bbox_sft.cli import main
from bbox_sft.data import PrepareArguments, prepare_dataset
from bbox_sft.data.splits import assign_splits
from bbox_sft.formats import format_answer, parse_answer
from bbox_sft.tasks.subject import INSTRUCTION


def _prepare(data_dir: Path, out: Path, **kwargs) -> datasets.DatasetDict:
    sizes = {"train_size": 1000, "val_size": 200, "test_size": 200, **kwargs}
    return prepare_dataset(PrepareArguments(data_dir=str(data_dir), output_dir=str(out), **sizes))


def _boxes(dataset: datasets.DatasetDict) -> dict[str, list[float]]:
    return {i: b for split in dataset.values() for i, b in zip(split["image_id"], split["box"])}


def test_records_hold_image_box_and_chat_turns(synthetic_dir: Path, tmp_path: Path) -> None:
    dataset = _prepare(synthetic_dir, tmp_path / "out", train_size=40, val_size=10, test_size=10)
    reloaded = datasets.load_from_disk(str(tmp_path / "out"))
    assert isinstance(reloaded, datasets.DatasetDict)
    assert set(reloaded) == {"train", "validation", "test"}
    assert sum(len(s) for s in reloaded.values()) <= 60
    record = reloaded["train"][0]
    assert record["image"].size == (record["width"], record["height"])
    mask_path = synthetic_dir / "DUTS-TR" / "DUTS-TR-Mask" / f"{record['image_id']}.png"
    expected = mask_to_box(cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE))
    assert record["box"] == pytest.approx(expected, abs=1e-6)
    assert record["prompt"][0]["role"] == "user"
    assert [c["type"] for c in record["prompt"][0]["content"]] == ["image", "text"]
    assert record["prompt"][0]["content"][1]["text"] == INSTRUCTION
    answer = record["completion"][0]["content"][0]["text"]
    assert record["completion"][0]["role"] == "assistant"
    assert answer == format_answer(record["box"])
    assert parse_answer(answer) == pytest.approx(record["box"], abs=0.005)
    report = json.loads((tmp_path / "out" / "build_report.json").read_text())
    assert report["usable"] == 60 and report["skipped"] == {}
    assert report["split_sizes"] == {k: len(v) for k, v in dataset.items()}
    assert "wang2017duts" in (tmp_path / "out" / "README.md").read_text()


def test_zip_and_folder_give_the_same_boxes(synthetic_dir: Path, tmp_path: Path) -> None:
    zipped = tmp_path / "zipped"
    zipped.mkdir()
    with zipfile.ZipFile(zipped / "DUTS-TR.zip", "w") as archive:
        for path in sorted((synthetic_dir / "DUTS-TR").rglob("*")):
            archive.write(path, path.relative_to(synthetic_dir))
    from_folder = _boxes(_prepare(synthetic_dir, tmp_path / "a"))
    from_zip = _boxes(_prepare(zipped, tmp_path / "b"))
    assert len(from_folder) == 60
    assert from_zip == from_folder
    shutil.rmtree(zipped)  # the saved dataset holds the image bytes, not paths into the source
    reloaded = datasets.load_from_disk(str(tmp_path / "b"))["train"]
    assert reloaded[0]["image"].size == (reloaded[0]["width"], reloaded[0]["height"])


def test_duts_te_becomes_the_test_split(synthetic_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "duts"
    shutil.copytree(synthetic_dir / "DUTS-TR", data / "DUTS-TR")
    from bbox_sft.data.synthetic import write_synthetic_set

    write_synthetic_set(data, n=12, seed=7, name="DUTS-TE", prefix="te")
    dataset = _prepare(data, tmp_path / "out", test_size=100)
    assert len(dataset["test"]) == 12
    assert all(i.startswith("te_") for i in dataset["test"]["image_id"])
    assert not any(i.startswith("te_") for s in ("train", "validation") for i in dataset[s]["image_id"])


def _save_exif_rotated(path: Path, upright: Image.Image) -> None:
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # orientation 6 turns it back upright
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, exif=exif, quality=95)


@pytest.fixture
def bad_dir(synthetic_dir: Path, tmp_path: Path) -> Path:
    """Six good pairs plus one of each kind of bad or odd input."""
    root = tmp_path / "bad"
    images, masks = root / "set" / "images", root / "set" / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    src = synthetic_dir / "DUTS-TR"
    for path in sorted((src / "DUTS-TR-Image").glob("*.jpg"))[:6]:
        shutil.copy(path, images / path.name)
        shutil.copy(src / "DUTS-TR-Mask" / f"{path.stem}.png", masks / f"{path.stem}.png")
    good_mask = np.zeros((80, 120), np.uint8)
    good_mask[20:60, 10:40] = 255
    upright = np.zeros((80, 120, 3), np.uint8)
    upright[20:60, 10:40] = (255, 0, 0)

    (images / "garbage.jpg").write_bytes(b"this is not a jpeg")
    cv2.imwrite(str(masks / "garbage.png"), good_mask)
    full = (images / "truncated.jpg")
    Image.fromarray(upright).save(full, quality=95)
    full.write_bytes(full.read_bytes()[: 300])
    cv2.imwrite(str(masks / "truncated.png"), good_mask)
    Image.fromarray(upright).save(images / "nomask.jpg")
    Image.fromarray(upright).save(images / "empty.jpg")
    cv2.imwrite(str(masks / "empty.png"), np.zeros((80, 120), np.uint8))
    Image.fromarray(upright).save(images / "mismatch.jpg")
    cv2.imwrite(str(masks / "mismatch.png"), np.zeros((40, 60), np.uint8) + 255)
    (masks / "badmask.png").write_bytes(b"\x89PNG broken")
    Image.fromarray(upright).save(images / "badmask.jpg")
    cv2.imwrite(str(masks / "orphan.png"), good_mask)
    _save_exif_rotated(images / "exif.jpg", Image.fromarray(upright))
    cv2.imwrite(str(masks / "exif.png"), good_mask)
    _save_exif_rotated(images / "exif_raw_mask.jpg", Image.fromarray(upright))
    cv2.imwrite(str(masks / "exif_raw_mask.png"), np.rot90(good_mask))  # drawn on the stored pixels
    Image.fromarray(upright).convert("CMYK").save(images / "cmyk.jpg")
    Image.fromarray(upright).convert("RGBA").save(images / "rgba.png")
    Image.fromarray(upright).convert("L").save(images / "gray.png")
    for stem in ("cmyk", "rgba", "gray"):
        cv2.imwrite(str(masks / f"{stem}.png"), good_mask)
    cv2.imwrite(str(masks / "zero_one.png"), good_mask // 255)
    Image.fromarray(upright).save(images / "zero_one.png")
    return root


def test_bad_input_is_skipped_counted_and_named(bad_dir: Path, tmp_path: Path) -> None:
    dataset = _prepare(bad_dir, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "build_report.json").read_text())
    assert report["skipped"] == {
        "unreadable_image": 2,
        "missing_mask": 1,
        "empty_mask": 1,
        "size_mismatch": 1,
        "unreadable_mask": 1,
        "missing_image": 1,
    }
    assert report["handled"] == {
        "exif_rotated": 2,
        "converted_CMYK_to_RGB": 1,
        "converted_RGBA_to_RGB": 1,
        "converted_L_to_RGB": 1,
        "mask_0_1": 1,
    }
    named = {Path(f["image"] or f["mask"]).stem: f["reason"] for f in report["skipped_files"]}
    assert named == {
        "garbage": "unreadable_image",
        "truncated": "unreadable_image",
        "nomask": "missing_mask",
        "empty": "empty_mask",
        "mismatch": "size_mismatch",
        "badmask": "unreadable_mask",
        "orphan": "missing_image",
    }
    records = {r["image_id"]: r for split in dataset.values() for r in split}
    assert len(records) == 6 + 6
    for stem in ("exif", "exif_raw_mask", "cmyk", "rgba", "gray", "zero_one"):
        record = records[stem]
        assert record["box"] == pytest.approx((10 / 120, 20 / 80, 40 / 120, 60 / 80)), stem
        image = record["image"]
        assert image.mode == "RGB" and image.size == (120, 80), stem
        r, g, b = image.getpixel((25, 40))
        assert r > 150 and g < 80 and b < 80 or stem == "gray", stem  # upright: the subject is where the mask says


def test_cli_prepare_summarises_and_visualises(bad_dir: Path, tmp_path: Path, caplog) -> None:
    out = tmp_path / "cli"
    with caplog.at_level("INFO", logger="bbox_sft"):  # an earlier training run may have set it higher
        code = main(["prepare", "--data_dir", str(bad_dir), "--output_dir", str(out), "--visualize",
                     "--train_size", "8", "--val_size", "2", "--test_size", "2"])
    assert code == 0
    assert "skipped: 1 empty_mask, 1 missing_image, 1 missing_mask" in caplog.text
    preview = Image.open(out / "preview.png")
    assert preview.size[0] >= 512
    assert datasets.load_from_disk(str(out))["train"].num_rows <= 8


def test_push_without_network_fails_clearly_and_keeps_the_build(synthetic_dir: Path, tmp_path: Path, caplog) -> None:
    out = tmp_path / "pushed"
    code = main(["prepare", "--data_dir", str(synthetic_dir), "--output_dir", str(out),
                 "--push_to_hub", "someone/saliency-boxes"])
    assert code == 1
    assert "someone/saliency-boxes" in caplog.text and str(out) in caplog.text
    assert len(datasets.load_from_disk(str(out))["train"]) > 0


def test_missing_data_dir_is_named(tmp_path: Path, caplog) -> None:
    code = main(["prepare", "--data_dir", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "o")])
    assert code == 2
    assert "nowhere" in caplog.text and "no images found" in caplog.text
    assert not (tmp_path / "o").exists()


def test_download_help_runs_as_a_console_script() -> None:
    bbox_sft = Path(sys.executable).parent / "bbox-sft"
    result = subprocess.run([str(bbox_sft), "prepare", "--download_help"], capture_output=True, text=True, check=True)
    assert "DUTS-TR.zip" in result.stdout and "images/" in result.stdout


# --- splits ---------------------------------------------------------------------------------


def test_splits_are_deterministic_and_sized() -> None:
    ids = [f"img_{i:05d}" for i in range(3000)]
    sizes = {"train": 2000, "validation": 500, "test": 500}
    first, again = assign_splits(ids, sizes, seed=3), assign_splits(list(reversed(ids)), sizes, seed=3)
    assert first == again
    assert all(len(first[s]) <= sizes[s] for s in sizes)
    assert sum(len(v) for v in first.values()) > 2850  # pools near their proportions
    assert not set(first["train"]) & set(first["test"]) and not set(first["train"]) & set(first["validation"])
    assert assign_splits(ids, sizes, seed=4) != first


@settings(max_examples=25, deadline=None)
@given(st.integers(50, 400), st.integers(1, 300), st.integers(0, 10))
def test_adding_images_never_moves_an_image_to_another_split(n: int, added: int, seed: int) -> None:
    sizes = {"train": 10_000, "validation": 10_000, "test": 10_000}  # no cap: compare whole pools
    before = assign_splits([f"a{i}" for i in range(n)], sizes, seed)
    after = assign_splits([f"a{i}" for i in range(n + added)], sizes, seed)
    for split in before:
        assert set(before[split]) <= set(after[split])
