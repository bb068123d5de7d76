"""Lin's concordance correlation coefficient (CCC) and its summaries per feature class.

Lin, L. I.-K. (1989), "A concordance correlation coefficient to evaluate reproducibility",
Biometrics 45:255-268, eq. (2a) with the sample moments of eq. (3) (divisor n, not n - 1):

    rho_c = 2 s_xy / (s_x^2 + s_y^2 + (mean_x - mean_y)^2)

It is 1 only when every pair agrees exactly (y = x), and falls both with scatter (correlation)
and with a shift or a scale change (accuracy), which is why radiomics reproducibility studies
use it instead of Pearson's r.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

CCC_THRESHOLDS: tuple[float, float] = (0.85, 0.90)
"""Agreement thresholds reported as shares of features (the paper's Table I convention)."""

_CONSTANT_RELATIVE_TOLERANCE = 1e-9


def reference_is_constant(reference: npt.ArrayLike) -> bool:
    """True when the reference values do not vary across ROIs (CCC is undefined there).

    A feature counts as constant when its SD is below 1e-9 of its mean magnitude (or exactly 0
    for a zero mean): float rounding in the extractor must not make a constant look variable.
    """
    x = np.asarray(reference, dtype=np.float64)
    spread = float(np.std(x))
    scale = float(np.mean(np.abs(x)))
    return spread <= _CONSTANT_RELATIVE_TOLERANCE * scale if scale > 0.0 else spread == 0.0


def lin_ccc(reference: npt.ArrayLike, candidate: npt.ArrayLike) -> float:
    """Lin's CCC between paired values (1-D, same length >= 2, all finite).

    Returns NaN when the reference is constant (`reference_is_constant`): agreement with a
    feature that does not vary between ROIs says nothing. Raises ValueError on bad input.
    """
    x = np.asarray(reference, dtype=np.float64)
    y = np.asarray(candidate, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"CCC needs two 1-D arrays of equal length, got {x.shape} and {y.shape}")
    if x.size < 2:
        raise ValueError(f"CCC needs at least 2 paired values, got {x.size}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("CCC input holds NaN or infinite values")
    if reference_is_constant(x):
        return float("nan")
    mx, my = x.mean(), y.mean()
    sxx = np.mean((x - mx) ** 2)
    syy = np.mean((y - my) ** 2)
    sxy = np.mean((x - mx) * (y - my))
    return float(2.0 * sxy / (sxx + syy + (mx - my) ** 2))


@dataclass(frozen=True)
class ClassSummary:
    """CCC over the features of one class (e.g. GLCM) for one row and ROI group.

    mean / sd: over the features with a defined CCC (SD with divisor n; NaN if none).
    share_085 / share_090: fraction of those features with CCC >= 0.85 / >= 0.90.
    n_features: features with a defined CCC; n_skipped: features left out (constant in the
    reference, or not finite in the reference or the candidate for some ROI).
    """

    mean: float
    sd: float
    share_085: float
    share_090: float
    n_features: int
    n_skipped: int


def summarize(values: Sequence[float], n_skipped: int) -> ClassSummary:
    """Summary of the defined CCC values of one class; `n_skipped` is carried through."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        nan = float("nan")
        return ClassSummary(nan, nan, nan, nan, 0, n_skipped + len(values))
    return ClassSummary(
        mean=float(v.mean()),
        sd=float(v.std()),
        share_085=float(np.mean(v >= CCC_THRESHOLDS[0])),
        share_090=float(np.mean(v >= CCC_THRESHOLDS[1])),
        n_features=int(v.size),
        n_skipped=n_skipped + (len(values) - int(v.size)),
    )


def ccc_per_feature(
    reference: npt.NDArray[np.float64], candidate: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    """CCC of each column (feature) of [n_rois, n_features] arrays; NaN where undefined.

    Undefined: fewer than 2 ROIs, a constant reference, or a non-finite value in the column.
    """
    if reference.shape != candidate.shape or reference.ndim != 2:
        raise ValueError(f"feature tables differ in shape: {reference.shape} vs {candidate.shape}")
    out = np.full(reference.shape[1], np.nan)
    if reference.shape[0] < 2:
        return out
    for j in range(reference.shape[1]):
        x, y = reference[:, j], candidate[:, j]
        if np.all(np.isfinite(x)) and np.all(np.isfinite(y)):
            out[j] = lin_ccc(x, y)
    return out


def summarize_by_class(
    ccc: npt.NDArray[np.float64], feature_classes: Sequence[str], classes: Sequence[str]
) -> Mapping[str, ClassSummary]:
    """Per class (in `classes` order) the summary of `ccc`, whose entries belong to
    `feature_classes` (same length); plus "all" over every feature."""
    if len(ccc) != len(feature_classes):
        raise ValueError(f"{len(ccc)} CCC values for {len(feature_classes)} feature classes")
    out: dict[str, ClassSummary] = {}
    for name in [*classes, "all"]:
        values = [float(c) for c, k in zip(ccc, feature_classes, strict=True) if name in ("all", k)]
        out[name] = summarize(values, 0)
    return out
