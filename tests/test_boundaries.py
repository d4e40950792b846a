"""Every documented boundary tested at the boundary, and every map between frames against a value computed
another way (pixels found in the picture itself, not the mapping under test)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from bbox_sft.boxes import Box, mask_to_box, mask_to_boxes
from bbox_sft.calibration import expected_calibration_error, reliability_bins
from bbox_sft.detection import detection_metrics, match
from bbox_sft.formats import LabelledBox
from bbox_sft.images import ORIENTATION_TRANSPOSE, SIDEWAYS, open_image, pad_to_aspect_ratio, target_size
from bbox_sft.validation import equal_shard


def _bounds(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Pixel edges (x0, y0, x1, y1) of the True pixels of a mask, read off the array."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


# --- the letterbox: padded frame <-> original frame -------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.integers(2001, 9000), st.integers(1, 9), st.booleans(), st.data())
def test_a_box_in_the_padded_frame_maps_to_the_pixels_it_covers_in_the_original(long: int, short: int, wide: bool,
                                                                                data) -> None:
    width, height = (long, short) if wide else (short, long)
    x0 = data.draw(st.integers(0, width - 1))
    x1 = data.draw(st.integers(x0 + 1, width))
    y0 = data.draw(st.integers(0, height - 1))
    y1 = data.draw(st.integers(y0 + 1, height))
    assume((x1 - x0) * (y1 - y0) <= 0.9 * width * height)  # the fill (the mean colour) stays bluish
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[..., 2] = 255
    pixels[y0:y1, x0:x1] = (255, 0, 0)
    padded, letterbox = pad_to_aspect_ratio(Image.fromarray(pixels))
    assert letterbox is not None
    rgb = np.asarray(padded)
    marked = (rgb[..., 0] == 255) & (rgb[..., 2] == 0)  # where the red rectangle landed in the padded picture
    px0, py0, px1, py1 = _bounds(marked)
    in_padded = Box(px0 / padded.width, py0 / padded.height, px1 / padded.width, py1 / padded.height)
    assert letterbox.to_original(in_padded) == pytest.approx((x0 / width, y0 / height, x1 / width, y1 / height))


def test_a_box_reaching_into_the_padding_stays_inside_the_original_frame() -> None:
    _, letterbox = pad_to_aspect_ratio(Image.new("RGB", (8000, 20)))
    assert letterbox.top > 0  # padding above and below
    whole = letterbox.to_original(Box(0.0, 0.0, 1.0, 1.0))  # the whole padded picture, padding included
    assert whole == (0.0, 0.0, 1.0, 1.0)
    band = letterbox.to_original(Box(0.25, 0.0, 0.5, 0.1))  # only padding in y: an empty band on the top edge
    assert all(0.0 <= v <= 1.0 for v in band) and band.y_min == band.y_max == 0.0


@pytest.mark.slow
def test_list_answers_on_a_panorama_come_back_in_its_own_frame(tiny_model_dir: Path, processor) -> None:
    """The objects task on an 8000x20 image: every listed box mapped back, against the pixels by hand."""
    from transformers import AutoModelForImageTextToText

    from bbox_sft.decoding import generate_answers
    from bbox_sft.formats import parse_objects

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    closing = [i for i, t in enumerate(processor.tokenizer.convert_ids_to_tokens(range(processor.tokenizer.vocab_size)))
               if "]" in t]
    penalty = torch.zeros(model.config.text_config.vocab_size)
    penalty[closing] = -8.0  # an untrained model closes its list at once: make it write some objects
    model.register_forward_hook(lambda module, args, kwargs, output: setattr(output, "logits", output.logits + penalty)
                                or output, with_kwargs=True)
    panorama = np.full((20, 8000, 3), 30, np.uint8)
    image = Image.fromarray(panorama)
    options = dict(task="objects", labels=["cat", "dog"], max_new_tokens=120, progress=False)
    [ours] = generate_answers(model, processor, [image], **options)
    padded, letterbox = pad_to_aspect_ratio(image)
    [by_hand] = generate_answers(model, processor, [padded], **options)
    assert ours.raw == by_hand.raw
    written = parse_objects(by_hand.raw)
    assert written, by_hand.raw
    top, pad_h = letterbox.top, padded.height
    expected = [(o.label, (o.box[0], min(max((o.box[1] * pad_h - top) / 20, 0), 1), o.box[2],
                           min(max((o.box[3] * pad_h - top) / 20, 0), 1))) for o in written]
    assert [o.label for o in ours.objects] == [label for label, _ in expected]
    for obj, (_, box) in zip(ours.objects, expected):
        assert obj.box == pytest.approx(box, abs=1e-9)
    assert [o.box for o in ours.objects] != [o.box for o in written]  # the frames really differ


# --- decoding photos small: JPEG draft in the stored orientation -------------------------------------


def test_an_exif_rotated_photo_is_drafted_in_its_stored_orientation(processor, monkeypatch) -> None:
    """A sideways-stored 2400x1200 JPEG (upright 1200x2400): the draft asks for the target in stored pixels."""
    buffer = io.BytesIO()
    stored = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1200, 2400, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 270 to show upright: sideways
    stored.save(buffer, format="JPEG", exif=exif)
    assert ORIENTATION_TRANSPOSE[6] in SIDEWAYS
    from PIL import JpegImagePlugin

    asked, original = [], JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        asked.append(size)
        return original(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    image, (width, height) = open_image(buffer.getvalue(), processor)
    assert (width, height) == (1200, 2400)
    upright_target = target_size(1200, 2400, processor)
    assert asked == [(upright_target[1], upright_target[0])]  # the stored (sideways) frame: wide, not tall
    assert image.size == upright_target


# --- the metrics at their documented boundaries ----------------------------------------------------


def test_a_box_with_iou_exactly_one_half_is_matched() -> None:
    truth = [LabelledBox("cat", Box(0.0, 0.0, 1.0, 1.0))]
    half = [LabelledBox("cat", Box(0.0, 0.0, 0.5, 1.0))]  # inside the truth, half its area: IoU exactly 0.5
    assert match(half, truth) == [(0, 0)]
    assert detection_metrics([half], [truth])["f1@0.5"] == 1.0
    less = [LabelledBox("cat", Box(0.0, 0.0, 0.5 - 1e-9, 1.0))]
    assert match(less, truth) == []


def test_an_empty_answer_on_an_image_with_objects_is_not_precise() -> None:
    truth = [[LabelledBox("cat", Box(0.1, 0.1, 0.4, 0.4))], [LabelledBox("dog", Box(0.5, 0.5, 0.9, 0.9))]]
    metrics = detection_metrics([[], []], truth)
    assert metrics["precision@0.5"] == 0.0 and metrics["recall@0.5"] == 0.0 and metrics["f1@0.5"] == 0.0
    assert detection_metrics([[], []], [[], []])["precision@0.5"] == 1.0  # nothing to find, nothing found


def test_a_confidence_of_exactly_one_counts_in_the_last_bin() -> None:
    bins = reliability_bins([1.0, 1.0, 0.95], [False, False, True], bins=10)
    assert bins == [(pytest.approx((1.0 + 1.0 + 0.95) / 3), pytest.approx(1 / 3), 3)]
    assert expected_calibration_error([1.0], [False]) == 1.0  # a sure miss is the worst calibration there is
    assert expected_calibration_error([0.0], [True]) == 1.0


def test_a_component_of_exactly_min_fraction_of_the_largest_is_kept() -> None:
    mask = np.zeros((40, 60), np.uint8)
    mask[0:10, 0:10] = 255  # 100 px, the largest
    mask[20:25, 40:45] = 255  # 25 px: exactly 0.25 of it
    assert len(mask_to_boxes(mask, min_fraction=0.25)) == 2
    assert mask_to_box(mask, mode="components", min_fraction=0.25) == (0.0, 0.0, 45 / 60, 25 / 40)
    mask[24, 40:45] = 0  # 20 px: under the fraction
    assert len(mask_to_boxes(mask, min_fraction=0.25)) == 1


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.integers(1, 9))
def test_validation_shards_pad_only_what_does_not_divide(n: int, world: int) -> None:
    padded = [equal_shard(n, rank, world)[1] for rank in range(world)]
    assert len(padded[0]) == -(-n // world)  # ceil(n / world): no rank gets an extra item
    assert sum(map(len, padded)) - n == (-n) % world  # the padding is exactly what makes the shards equal


def test_success_and_a_hit_at_iou_exactly_one_half() -> None:
    from bbox_sft.calibration import confidence_metrics
    from bbox_sft.metrics import box_metrics

    truth, half = (0.0, 0.0, 1.0, 1.0), (0.0, 0.0, 0.5, 1.0)  # IoU exactly 0.5 ("Success@0.5: IoU >= 0.5")
    assert box_metrics([half], [truth])["success@0.5"] == 1.0
    assert box_metrics([(0.0, 0.0, 0.5 - 1e-9, 1.0)], [truth])["success@0.5"] == 0.0
    # the confidence means P(IoU >= 0.5): a sure hit at exactly 0.5 is perfectly calibrated
    assert confidence_metrics([1.0], [0.5])["confidence_ece"] == 0.0


def test_a_mask_pixel_at_exactly_the_threshold_is_foreground() -> None:
    mask = np.zeros((10, 10), np.uint8)
    mask[2:4, 3:6] = 128
    assert mask_to_box(mask, threshold=128) == (0.3, 0.2, 0.6, 0.4)
    assert mask_to_box(mask, threshold=129) is None


def test_an_aspect_ratio_of_exactly_the_limit_is_not_padded() -> None:
    from bbox_sft.images import MAX_ASPECT_RATIO, padded_size

    assert padded_size(200 * 7, 7) == (1400, 7)  # 200:1, what the processor takes ("over 200:1" is refused)
    assert padded_size(7, 200 * 7) == (7, 1400)
    assert padded_size(200 * 7 + 1, 7) == (1401, 8)
    assert MAX_ASPECT_RATIO == 200
