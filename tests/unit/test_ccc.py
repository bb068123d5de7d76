"""Lin's concordance correlation coefficient and its per-class summaries."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evaluation.ccc import ccc_per_feature, lin_ccc, summarize_by_class


def test_ccc_matches_hand_computed_example() -> None:
    # x = 1, 2, 3, 4; y = 2, 3, 3, 5 (divisor n, Lin 1989 eq. 3):
    # mean x 2.5, mean y 3.25; s_xx = 1.25, s_yy = 1.1875, s_xy = 1.125
    # CCC = 2 * 1.125 / (1.25 + 1.1875 + 0.75**2) = 2.25 / 3.0 = 0.75
    assert lin_ccc([1, 2, 3, 4], [2, 3, 3, 5]) == pytest.approx(0.75, abs=1e-12)


def test_ccc_is_one_only_for_identity_and_penalizes_shift_and_scale() -> None:
    x = np.array([0.3, 1.7, 2.2, 5.0, 4.1])
    assert lin_ccc(x, x) == pytest.approx(1.0)
    # Perfectly correlated but shifted or scaled: Pearson would say 1, CCC must not.
    assert lin_ccc(x, x + 1.0) < 0.9
    assert lin_ccc(x, 2.0 * x) < 0.9
    assert lin_ccc(x, -x) < 0


def test_ccc_undefined_for_constant_reference() -> None:
    assert math.isnan(lin_ccc([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]))


def test_ccc_rejects_bad_input_with_a_message() -> None:
    with pytest.raises(ValueError, match="equal length"):
        lin_ccc([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="NaN"):
        lin_ccc([1, 2, float("nan")], [1, 2, 3])


def test_per_feature_ccc_and_class_summary_count_skipped_features() -> None:
    reference = np.array([[1.0, 5.0, 1.0], [2.0, 5.0, 2.0], [3.0, 5.0, 3.0], [4.0, 5.0, 4.0]])
    candidate = np.array([[2.0, 1.0, 1.0], [3.0, 2.0, 2.0], [3.0, 3.0, 3.0], [5.0, 4.0, 4.0]])
    ccc = ccc_per_feature(reference, candidate)
    assert ccc[0] == pytest.approx(0.75)
    assert math.isnan(ccc[1])  # constant in the reference
    assert ccc[2] == pytest.approx(1.0)

    summary = summarize_by_class(ccc, ["glcm", "glcm", "ngtdm"], ["glcm", "ngtdm"])
    assert summary["glcm"].n_features == 1
    assert summary["glcm"].n_skipped == 1
    assert summary["glcm"].mean == pytest.approx(0.75)
    assert summary["ngtdm"].share_090 == 1.0
    assert summary["all"].mean == pytest.approx(0.875)
    assert summary["all"].sd == pytest.approx(0.125)
    assert summary["all"].share_085 == pytest.approx(0.5)
