"""ROIs come from the reference only, reproducibly, inside the body and the HU range."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from evaluation import rois as rois_module
from evaluation.rois import (
    LESION_GROUP,
    body_mask,
    group_name,
    hu_range_rois,
    lesion_rois,
    mask_reference,
    window_counts,
)


def chest_like(n_slices: int = 3, size: int = 96) -> np.ndarray:
    """Air around a soft-tissue disc (40 HU) with a lung (-850) holding denser (-500) blobs,
    a fat band (-90) and a bone rod (600)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    c = (size - 1) / 2
    image = np.full((size, size), -1000.0)
    image[np.hypot(y - c, x - c) < 0.45 * size] = 40.0
    image[np.hypot(y - c, x - c) < 0.45 * size] = 40.0
    image[(np.hypot(y - c, x - c) > 0.40 * size) & (np.hypot(y - c, x - c) < 0.45 * size)] = -90
    lung = np.hypot(y - c, x - c - 0.15 * size) < 0.18 * size
    image[lung] = -850.0
    image[lung & (np.hypot(y - c + 6, x - c - 0.15 * size) < 5)] = -500.0
    image[np.hypot(y - c - 0.25 * size, x - c) < 6] = 600.0
    return np.repeat(image[None], n_slices, axis=0).astype(np.float32)


def test_body_mask_fills_the_lungs_and_leaves_out_a_separate_table() -> None:
    image = chest_like(1)[0]
    image[-4:, :] = 200.0  # a "table" that does not touch the body
    body = body_mask(image)
    assert body[48, 62]  # inside the lung: filled
    assert not body[0, 0]
    assert not body[-2, 48]


def test_window_counts_equals_a_direct_sum() -> None:
    rng = np.random.default_rng(3)
    mask = rng.random((20, 24)) > 0.6
    counts = window_counts(mask, 6)
    assert counts[10, 12] == mask[7:13, 9:15].sum()
    assert counts[2, 12] == 0  # window would leave the image


def test_hu_range_rois_are_reproducible_inside_body_and_range() -> None:
    reference = chest_like()
    z = [0.0, 1.0, 2.0]
    first = hu_range_rois(reference, "S1", z, n_per_range=6, window_px=16, min_pixels=20, seed=7)
    again = hu_range_rois(reference, "S1", z, n_per_range=6, window_px=16, min_pixels=20, seed=7)
    other = hu_range_rois(reference, "S1", z, n_per_range=6, window_px=16, min_pixels=20, seed=8)
    assert [r.key() for r in first] == [r.key() for r in again]
    assert [r.key() for r in first] != [r.key() for r in other]
    assert {r.group for r in first} == {group_name(g) for g in rois_module.HU_RANGES}
    for roi in first:
        lo, hi = next(g for g in rois_module.HU_RANGES if group_name(g) == roi.group)
        values = roi.crop(reference[roi.slice_index])[roi.mask]
        assert roi.n_pixels >= 20
        assert values.min() >= lo and values.max() <= hi, roi.group
        assert roi.crop(body_mask(reference[roi.slice_index]))[roi.mask].all()


def test_lesion_rois_one_per_nodule_and_slice_above_the_pixel_minimum() -> None:
    ids = np.zeros((3, 40, 40), np.uint8)
    ids[0, 5:12, 5:12] = 1  # 49 px
    ids[1, 5:9, 5:9] = 1  # 16 px: too small
    ids[1, 20:30, 20:30] = 2  # 100 px
    found = lesion_rois(ids, "S1", [0.0, 1.0, 2.0], min_pixels=30)
    assert [(r.slice_index, r.origin, r.n_pixels) for r in found] == [
        (0, "nodule 1", 49),
        (1, "nodule 2", 100),
    ]
    assert all(r.group == LESION_GROUP for r in found)
    assert found[0].mask.shape == (9, 9)  # bounding box + 1 px margin


def test_mask_reference_prefers_ground_truth() -> None:
    target = chest_like() + np.random.default_rng(0).normal(0, 40, (3, 96, 96)).astype(np.float32)
    ideal = chest_like().astype(np.int16)
    assert np.array_equal(mask_reference(target, ideal), ideal.astype(np.float32))
    smoothed = mask_reference(target, None)
    assert smoothed.shape == target.shape
    assert smoothed[:, 40:56, 20:30].std() < target[:, 40:56, 20:30].std()


def test_roi_functions_take_no_candidate_image() -> None:
    # The masks must not depend on any candidate: the builders only accept reference data.
    for function in (hu_range_rois, lesion_rois, mask_reference):
        parameters = set(inspect.signature(function).parameters)
        assert not parameters & {"candidate", "output", "prediction"}, function.__name__


def test_crop_with_padding_uses_image_content_and_edge_values() -> None:
    image = np.arange(100, dtype=np.float32).reshape(10, 10)
    roi = rois_module.Roi("S", "g", 0, 0.0, 0, 2, np.ones((3, 3), bool), "random")
    padded = roi.crop(image, pad=1)
    assert padded.shape == (5, 5)
    assert padded[1, 1] == image[0, 2]
    assert padded[0, 0] == image[0, 1]  # above the image: the edge row repeated
    assert roi.padded_mask(1).sum() == 9
    with pytest.raises(ValueError, match="hu_ideal shape"):
        mask_reference(np.zeros((1, 4, 4), np.float32), np.zeros((1, 5, 5), np.int16))
