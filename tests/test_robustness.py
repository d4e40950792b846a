"""Odd and hostile real-world input: every decodable image gets an answer, every other one a named reason.

Covers the image reader (extreme shapes, bit depths, modes, huge photos), the letterbox that
makes extreme shapes acceptable to the processor, ``predict`` and ``eval`` on such files, and
evaluation-only datasets (empty splits).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import datasets
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from bbox_sft.boxes import Box, mask_to_box
from bbox_sft.cli import main as cli
from bbox_sft.data import PrepareArguments, prepare_dataset
from bbox_sft.data.splits import assign_splits
from bbox_sft.images import (
    MAX_ASPECT_RATIO,
    ImageError,
    open_image,
    pad_to_aspect_ratio,
    target_size,
    to_rgb,
)

# --- the letterbox --------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 3000), st.integers(1, 12), st.booleans(), st.data())
def test_a_subject_in_a_padded_image_maps_back_to_its_box_without_padding(long: int, short: int, wide: bool,
                                                                          data) -> None:
    width, height = (long, short) if wide else (short, long)
    mask = np.zeros((height, width), np.uint8)
    x0 = data.draw(st.integers(0, width - 1))
    x1 = data.draw(st.integers(x0 + 1, width))
    y0 = data.draw(st.integers(0, height - 1))
    y1 = data.draw(st.integers(y0 + 1, height))
    mask[y0:y1, x0:x1] = 255
    padded, letterbox = pad_to_aspect_ratio(Image.fromarray(mask).convert("RGB"))
    ratio = max(padded.size) / min(padded.size)
    if max(width, height) / min(width, height) <= MAX_ASPECT_RATIO:
        assert letterbox is None and padded.size == (width, height)
        return
    assert ratio <= MAX_ASPECT_RATIO
    # the same subject drawn on the padded canvas: its box there, mapped back, is its box without padding
    padded_mask = np.zeros((letterbox.padded_height, letterbox.padded_width), np.uint8)
    padded_mask[letterbox.top: letterbox.top + height, letterbox.left: letterbox.left + width] = mask
    unpadded = mask_to_box(mask)
    assert letterbox.to_original(mask_to_box(padded_mask)) == pytest.approx(unpadded, abs=1e-9)
    assert letterbox.to_padded(Box(*unpadded)) == pytest.approx(mask_to_box(padded_mask), abs=1e-9)
    # and the padded image holds the original pixels exactly there
    crop = padded.crop((letterbox.left, letterbox.top, letterbox.left + width, letterbox.top + height))
    assert np.array_equal(np.asarray(crop)[..., 0], mask)


def test_the_processor_takes_every_padded_shape(processor) -> None:
    for size in ((8000, 20), (20, 8000), (1, 1), (201, 1), (1, 4000), (30000, 7)):
        image = Image.new("RGB", size, (200, 30, 30))
        padded, _ = pad_to_aspect_ratio(image)
        batch = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[[padded]], return_tensors="pt")
        assert batch["image_grid_thw"].shape == (1, 3), size


# --- reading images -------------------------------------------------------------------------


def test_sixteen_bit_images_keep_their_contrast() -> None:
    values = np.zeros((40, 60), np.uint16)
    values[10:30, 20:40] = 50_000  # the subject; background 0
    values[:, :5] = 12_000
    rgb = np.asarray(to_rgb(Image.fromarray(values)))
    assert rgb.shape == (40, 60, 3)
    assert rgb[20, 30, 0] == round(50_000 / 65535 * 255) and rgb[20, 10, 0] == 0 and rgb[20, 2, 0] == 47


def test_large_photos_are_decoded_small_to_the_processor_size(processor, tmp_path: Path) -> None:
    photo = np.zeros((3000, 4000, 3), np.uint8)
    photo[1000:2000, 500:1500] = (250, 250, 250)
    Image.fromarray(photo).save(tmp_path / "big.jpg", quality=90)
    image, size = open_image(tmp_path / "big.jpg", processor)
    assert size == (4000, 3000)
    assert image.size == target_size(4000, 3000, processor)
    assert image.size[0] * image.size[1] <= processor.image_processor.size["longest_edge"]
    # the processor resizes it no further: the size it would pick for the small image is its own
    assert target_size(*image.size, processor) == image.size
    grey = np.asarray(image.convert("L")) > 128
    ys, xs = np.nonzero(grey)
    w, h = image.size
    assert (xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h) == pytest.approx(
        (500 / 4000, 1000 / 3000, 1500 / 4000, 2000 / 3000), abs=0.03)
    small, size = open_image(tmp_path / "big.jpg")  # without a processor: the whole image
    assert small.size == size == (4000, 3000)


def _odd_files(folder: Path) -> dict[str, str | None]:
    """One file of each odd kind; the value is the reason it must fail with, or None if it must get a box."""
    folder.mkdir()
    subject = np.zeros((80, 120, 3), np.uint8)
    subject[20:60, 30:90] = (230, 230, 230)
    Image.fromarray(subject).save(folder / "a_normal.jpg")
    Image.new("RGB", (1, 1), (255, 0, 0)).save(folder / "b_one_pixel.png")
    Image.new("RGB", (8000, 20), (10, 10, 10)).save(folder / "c_wide.png")
    Image.new("RGB", (20, 8000), (10, 10, 10)).save(folder / "d_tall.png")
    deep = np.zeros((80, 120), np.uint16)
    deep[20:60, 30:90] = 60_000
    Image.fromarray(deep).save(folder / "e_sixteen_bit.png")
    Image.fromarray(subject).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "f_palette.png")
    frames = [Image.fromarray(np.roll(subject, 10 * i, axis=1)) for i in range(3)]
    frames[0].save(folder / "g_animated.gif", save_all=True, append_images=frames[1:], duration=50)
    Image.fromarray(subject).convert("CMYK").save(folder / "h_cmyk.jpg")
    Image.fromarray(subject).save(folder / "i_truncated.jpg", quality=95)
    (folder / "i_truncated.jpg").write_bytes((folder / "i_truncated.jpg").read_bytes()[:200])
    (folder / "j_empty.jpg").write_bytes(b"")
    (folder / "k_text.jpg").write_text("not an image at all\n")
    os.symlink(folder / "gone.jpg", folder / "l_dangling.jpg")
    Image.new("RGB", (700, 700), (40, 40, 40)).save(folder / "m_bomb.png")  # over the limit set in the test
    return {"a_normal": None, "b_one_pixel": None, "c_wide": None, "d_tall": None, "e_sixteen_bit": None,
            "f_palette": None, "g_animated": None, "h_cmyk": None, "i_truncated": "unreadable_image",
            "j_empty": "unreadable_image", "k_text": "unreadable_image", "l_dangling": "missing_file",
            "m_bomb": "too_many_pixels"}


def test_open_image_names_the_reason_for_each_odd_file(tmp_path: Path, monkeypatch, processor) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200_000)  # 700 x 700 is over twice that: PIL refuses
    expected = _odd_files(tmp_path / "odd")
    for stem, reason in expected.items():
        path = next((tmp_path / "odd").glob(stem + ".*"))
        if reason is None:
            image, (width, height) = open_image(path, processor)
            assert image.mode == "RGB" and width * height > 0, stem
        else:
            with pytest.raises(ImageError) as error:
                open_image(path, processor)
            assert error.value.reason == reason, (stem, str(error.value))


@pytest.mark.slow
def test_predict_answers_every_decodable_image_and_names_the_rest(tiny_model_dir: Path, tmp_path: Path,
                                                                   monkeypatch, capsys) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200_000)
    expected = _odd_files(tmp_path / "odd")
    code = cli(["predict", "--adapter", str(tiny_model_dir), "--dir", str(tmp_path / "odd"), "--batch_size", "2"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1  # the run went to the end, and the exit code says something was skipped
    assert [Path(line["image"]).stem for line in lines] == sorted(expected)  # every file, in order
    for line in lines:
        stem = Path(line["image"]).stem
        if expected[stem] is None:
            assert "error" not in line, line
            x0, y0, x1, y1 = line["box_px"]
            width, height = Image.open(line["image"]).size
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height, line
        else:
            assert line["image"].endswith(stem + Path(line["image"]).suffix) and line["error"], line


@pytest.mark.slow
def test_a_padded_panorama_gets_the_box_of_its_subject_back_in_its_own_frame(tiny_model_dir: Path,
                                                                            processor) -> None:
    """Generation on a padded image, mapped back, equals generating on the padded image by hand and mapping."""
    from transformers import AutoModelForImageTextToText

    from bbox_sft.decoding import generate_answers
    from bbox_sft.formats import parse_answer

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    panorama = np.full((20, 8000, 3), 30, np.uint8)
    panorama[5:15, 3000:3400] = 240
    image = Image.fromarray(panorama)
    [ours] = generate_answers(model, processor, [image], progress=False)
    padded, letterbox = pad_to_aspect_ratio(image)
    [by_hand] = generate_answers(model, processor, [padded], progress=False)
    assert ours.raw == by_hand.raw
    assert ours.box == pytest.approx(letterbox.to_original(parse_answer(by_hand.raw)))
    assert ours.box != parse_answer(by_hand.raw)  # the frames really differ (40 px of padding vs 20 px)


# --- the builder ----------------------------------------------------------------------------


def test_builder_skips_what_the_processor_cannot_take_and_fixes_odd_modes(synthetic_dir: Path, tmp_path: Path,
                                                                          monkeypatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200_000)
    root = tmp_path / "set"
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    for path in sorted((synthetic_dir / "DUTS-TR" / "DUTS-TR-Image").glob("*.jpg"))[:4]:
        shutil.copy(path, images / path.name)
        shutil.copy(synthetic_dir / "DUTS-TR" / "DUTS-TR-Mask" / f"{path.stem}.png", masks / f"{path.stem}.png")

    def mask_for(stem: str, width: int, height: int) -> None:
        mask = np.zeros((height, width), np.uint8)
        mask[height // 4: 3 * height // 4 + 1, width // 4: 3 * width // 4 + 1] = 255
        cv2.imwrite(str(masks / f"{stem}.png"), mask)

    Image.new("RGB", (8000, 20)).save(images / "wide.png")
    mask_for("wide", 8000, 20)
    Image.new("RGB", (700, 700)).save(images / "bomb.png")
    mask_for("bomb", 700, 700)
    deep = np.zeros((80, 120), np.uint16)
    deep[20:61, 30:91] = 60_000
    Image.fromarray(deep).save(images / "deep.png")
    mask_for("deep", 120, 80)
    frames = [Image.new("RGB", (120, 80), (0, 0, 200 * i)) for i in range(2)]
    frames[0].save(images / "animated.gif", save_all=True, append_images=frames[1:])
    mask_for("animated", 120, 80)
    Image.new("RGB", (1, 1), (255, 255, 255)).save(images / "dot.png")
    cv2.imwrite(str(masks / "dot.png"), np.full((1, 1), 255, np.uint8))
    os.symlink(images / "gone.jpg", images / "dangling.jpg")
    mask_for("dangling", 120, 80)

    dataset = prepare_dataset(PrepareArguments(data_dir=str(root), output_dir=str(tmp_path / "out"),
                                               train_size=100, val_size=0, test_size=0))
    report = json.loads((tmp_path / "out" / "build_report.json").read_text())
    named = {Path(f["image"]).stem: f["reason"] for f in report["skipped_files"]}
    assert named == {"wide": "processor_limit", "bomb": "too_many_pixels", "dangling": "missing_file"}
    assert "aspect ratio 400:1" in next(f["detail"] for f in report["skipped_files"] if "wide" in f["image"])
    assert report["handled"] == {"converted_I;16_to_RGB": 1, "animated_first_frame": 1, "converted_P_to_RGB": 1}
    records = {r["image_id"]: r for r in dataset["train"]}
    assert set(records) >= {"deep", "animated", "dot"}
    deep_record = np.asarray(records["deep"]["image"])
    assert deep_record[40, 60, 0] == round(60_000 / 65535 * 255) and deep_record[5, 5, 0] == 0  # not clipped white
    assert records["dot"]["box"] == [0.0, 0.0, 1.0, 1.0]
    assert records["animated"]["image"].mode == "RGB"


# --- evaluation-only sets -------------------------------------------------------------------


@pytest.fixture
def test_only_dir(tmp_path: Path) -> Path:
    from bbox_sft.data.synthetic import write_synthetic_set

    write_synthetic_set(tmp_path / "duts", n=12, seed=5, name="DUTS-TE", prefix="te")
    return tmp_path / "duts"


@pytest.mark.parametrize("train_size, val_size", [(0, 0), (1, 1)])
def test_a_test_only_set_builds_and_every_saved_split_loads(test_only_dir: Path, tmp_path: Path,
                                                            train_size: int, val_size: int) -> None:
    out = tmp_path / "te"
    assert cli(["prepare", "--data_dir", str(test_only_dir), "--output_dir", str(out), "--train_size",
                str(train_size), "--val_size", str(val_size), "--test_size", "5019"]) == 0
    reloaded = datasets.load_from_disk(str(out))
    assert {name: len(split) for name, split in reloaded.items()} == {"train": 0, "validation": 0, "test": 12}
    assert reloaded["train"].features == reloaded["test"].features
    report = json.loads((out / "build_report.json").read_text())
    assert report["empty_splits"] == ["train", "validation"]


def test_split_sizes_of_zero() -> None:
    ids = [f"a{i}" for i in range(50)]
    only_test = assign_splits(ids, {"train": 0, "validation": 0, "test": 20}, seed=1)
    assert [len(only_test[s]) for s in ("train", "validation", "test")] == [0, 0, 20]
    shipped = assign_splits(ids, {"train": 0, "validation": 0, "test": 7}, seed=1, test_ids=["t1", "t2"])
    assert sorted(shipped["test"]) == ["t1", "t2"] and not shipped["train"] and not shipped["validation"]
    with pytest.raises(ValueError, match="every split size is 0"):
        assign_splits(ids, {"train": 0, "validation": 0, "test": 0})


@pytest.mark.slow
def test_eval_on_a_test_only_set_uses_the_split_itself_as_prior(test_only_dir: Path, tiny_model_dir: Path,
                                                                tmp_path: Path) -> None:
    data = tmp_path / "te"
    assert cli(["prepare", "--data_dir", str(test_only_dir), "--output_dir", str(data), "--train_size", "0",
                "--val_size", "0", "--test_size", "100"]) == 0
    out = tmp_path / "eval"
    # batch 2: a window of 8 images, so the 12 test images stream through in two windows
    assert cli(["eval", "--adapter", str(tiny_model_dir), "--dataset", str(data), "--output_dir", str(out),
                "--batch_size", "2"]) == 0
    report = json.loads((out / "metrics.json").read_text())
    boxes = np.asarray(datasets.load_from_disk(str(data))["test"]["box"], dtype=float)
    assert report["center_prior_box"] == pytest.approx(boxes.mean(0).tolist())
    assert "evaluated split 'test' itself" in report["center_prior_source"]
    assert "evaluated split 'test' itself" in (out / "report.md").read_text()
    assert report["evaluated"] == 12 and len((out / "predictions.jsonl").read_text().splitlines()) == 12
