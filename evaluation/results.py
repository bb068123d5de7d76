"""What an evaluation run depends on and what it measured: `EvaluationConfig` and
`EvaluationResult`.

`evaluate` fills an `EvaluationResult`; `eval_report` turns it into Markdown, JSON and figures.
Both import this module and neither imports the other, so the dependency runs one way:
evaluate -> eval_report -> results.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from evaluation.ccc import reference_is_constant, summarize_by_class
from evaluation.image_metrics import NPS_BIN_WIDTH_LP_PER_MM, NpsAccumulator
from evaluation.radiomics_features import FEATURE_CLASSES, RadiomicsSettings, feature_class
from evaluation.rois import HU_RANGES, LESION_GROUP, Roi, group_name
from training.pairs import DEFAULT_SOURCE_KERNEL, DEFAULT_TARGET_KERNEL

SUBJECT_MIN_ROIS = 5
"""Fewest ROIs of one subject and group for a per-subject CCC (below it: reported, not computed)."""


@dataclass(frozen=True)
class EvaluationConfig:
    """Everything an evaluation run depends on (stored in the report).

    lesion_min_pixels: a nodule's mask on a slice needs this many pixels to be an ROI.
    rois_per_range / window_px / range_min_pixels: random HU-range ROIs per subject and range,
        square window side in pixels, least in-range pixels per window.
    nps_patch_px: side of the square NPS patches inside the uniform region.
    subject_min_rois: fewest ROIs of one subject and ROI group for a per-subject CCC.
    seed: the ROI placement seed (and the engines' seed through standardize_series when fixed).
    """

    data: tuple[Path, ...]
    out: Path
    subjects: tuple[str, ...] | None = None
    source_kernel: str = DEFAULT_SOURCE_KERNEL
    target_kernel: str = DEFAULT_TARGET_KERNEL
    seed: int = 0
    lesion_min_pixels: int = 30
    rois_per_range: int = 40
    window_px: int = 48
    range_min_pixels: int = 64
    nps_patch_px: int = 32
    subject_min_rois: int = SUBJECT_MIN_ROIS
    radiomics: RadiomicsSettings = field(default_factory=RadiomicsSettings)
    workers: int = 1
    figures: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if self.subject_min_rois < 2:
            raise ValueError(
                f"subject_min_rois = {self.subject_min_rois}: a CCC needs at least 2 ROIs"
            )

    def describe(self) -> dict[str, Any]:
        return {
            "data_folders": [p.name for p in self.data],
            "subjects_filter": list(self.subjects) if self.subjects else None,
            "source_kernel_pattern": self.source_kernel,
            "target_kernel_pattern": self.target_kernel,
            "seed": self.seed,
            "lesion_rois": {
                "mask": "truth.npz nodule_ids, the nodule itself (no ring), box = bbox + 1 px",
                "min_pixels": self.lesion_min_pixels,
            },
            "hu_range_rois": {
                "ranges_hu": [list(r) for r in HU_RANGES],
                "per_subject_and_range": self.rois_per_range,
                "window_px": self.window_px,
                "min_in_range_pixels": self.range_min_pixels,
                "mask_reference": "truth.npz hu_ideal, else true target smoothed (Gaussian 1 px)",
                "placement": "slice uniform, centre uniform among body pixels whose window fits "
                "and holds enough in-range pixels; numpy default_rng([seed, crc32(subject|group)])",
            },
            "nps": {
                "patch_px": self.nps_patch_px,
                "overlap": 0.5,
                "region": "truth uniform_roi (heart blood pool)",
                "detrend": "quadratic (2-D second-order polynomial per patch)",
                "bin_width_lp_per_mm": NPS_BIN_WIDTH_LP_PER_MM,
            },
            "per_subject_ccc": {
                "rois": "the subject's own ROIs of the group (same ROIs as pooled)",
                "min_rois": self.subject_min_rois,
            },
            "radiomics": self.radiomics.describe(),
            "workers": self.workers,
        }


@dataclass
class EvaluationResult:
    """What a run measured; `eval_report` turns it into Markdown, JSON and figures."""

    config: EvaluationConfig
    row_names: list[str]
    reference_name: str
    engines: list[dict[str, str]]
    rois: list[Roi]
    feature_names: list[str]
    features: dict[str, npt.NDArray[np.float64]]
    """Per row and for the reference: [n_rois, n_features], NaN where the row has no image."""
    ccc: dict[str, dict[str, npt.NDArray[np.float64]]]
    """ccc[group][row] = CCC per feature (NaN where undefined), pooled over subjects."""
    subject_ccc: dict[str, dict[str, dict[str, npt.NDArray[np.float64]]]]
    """subject_ccc[subject][group][row] = CCC per feature over that subject's ROIs of the group,
    every group for every subject; all NaN where the subject has fewer than
    `config.subject_min_rois` ROIs there (`subject_n_rois`)."""
    image_metrics: dict[str, Any]
    nps: dict[str, dict[str, NpsAccumulator]]
    """nps[subject or "all"][row or reference]."""
    data_summary: dict[str, Any]
    montage: dict[str, Any] | None
    timings_s: dict[str, float]
    notes: list[str]

    @property
    def groups(self) -> list[str]:
        present = {r.group for r in self.rois}
        ordered = [LESION_GROUP, *(group_name(r) for r in HU_RANGES)]
        return [g for g in ordered if g in present]

    def summaries(self) -> dict[str, dict[str, dict[str, Any]]]:
        """summaries[group][row][class] = ClassSummary as a dict (classes + "all")."""
        classes = [feature_class(n) for n in self.feature_names]
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for group, per_row in self.ccc.items():
            out[group] = {}
            for row, values in per_row.items():
                summary = summarize_by_class(values, classes, FEATURE_CLASSES)
                out[group][row] = {k: vars(v) for k, v in summary.items()}
        return out

    def skipped_features(self, group: str) -> list[str]:
        """Features whose reference values are constant (or not finite) across the group's ROIs:
        their CCC is undefined and they are left out of the summaries."""
        in_group = np.asarray([r.group == group for r in self.rois])
        reference = self.features[self.reference_name][in_group]
        return [
            name
            for j, name in enumerate(self.feature_names)
            if not np.all(np.isfinite(reference[:, j])) or reference_is_constant(reference[:, j])
        ]

    def n_rois(self, group: str, row: str) -> int:
        table = self.features[row]
        return sum(
            1 for i, r in enumerate(self.rois) if r.group == group and np.all(np.isfinite(table[i]))
        )

    @property
    def subjects(self) -> list[str]:
        """Subject labels in evaluation order."""
        return [s["subject"] for s in self.data_summary["subjects"]]

    def subject_rows(self, subject: str) -> list[str]:
        """The rows this subject has (the repeat-scan row only with a repeat scan)."""
        return list(self.subject_ccc[subject][self.groups[0]]) if self.groups else []

    def subject_n_rois(self, subject: str, group: str, row: str) -> int:
        return int(np.sum(roi_selection(self.rois, self.features[row], group, subject)))

    def subject_summaries(self) -> dict[str, dict[str, dict[str, Any]]]:
        """per_subject[subject][group] = {"n_rois": {row: n}, "too_few_rois": bool,
        "summary": {row: {class: ClassSummary as a dict} (classes + "all"), or None where the
        subject has fewer than `config.subject_min_rois` ROIs in the group}}."""
        classes = [feature_class(n) for n in self.feature_names]
        minimum = self.config.subject_min_rois
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for subject in self.subjects:
            out[subject] = {}
            for group in self.groups:
                n_rois = {
                    row: self.subject_n_rois(subject, group, row)
                    for row in self.subject_ccc[subject][group]
                }
                summary: dict[str, Any] = {}
                for row, values in self.subject_ccc[subject][group].items():
                    if n_rois[row] < minimum:
                        summary[row] = None
                        continue
                    by_class = summarize_by_class(values, classes, FEATURE_CLASSES)
                    summary[row] = {k: vars(v) for k, v in by_class.items()}
                out[subject][group] = {
                    "n_rois": n_rois,
                    "too_few_rois": any(n < minimum for n in n_rois.values()),
                    "summary": summary,
                }
        return out


def roi_selection(
    rois: Sequence[Roi],
    table: npt.NDArray[np.float64],
    group: str,
    subject: str | None = None,
) -> npt.NDArray[np.bool_]:
    """The ROIs of `group` (and of `subject`, None: all subjects) whose row `table` holds finite
    features for every feature."""
    chosen = np.asarray(
        [r.group == group and (subject is None or r.subject == subject) for r in rois], dtype=bool
    )
    finite: npt.NDArray[np.bool_] = np.all(np.isfinite(table), axis=1)
    return chosen & finite
