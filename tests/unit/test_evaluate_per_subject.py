"""Per-subject CCC of the evaluation, on hand-made feature tables (no PyRadiomics, no DICOM).

Two subjects: S1 spans a wide range of feature values and the candidate agrees with the reference
there; S2's values sit in a narrow band where the candidate runs against the reference. Pooled
over both, S1's spread dominates and the CCC looks fine: only the per-subject CCC shows S2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from evaluation.ccc import ccc_per_feature
from evaluation.eval_report import report_json, report_markdown
from evaluation.evaluate import ccc_by_group, subject_description
from evaluation.labels import REPEAT_ROW
from evaluation.radiomics_features import FEATURE_CLASSES
from evaluation.results import EvaluationConfig, EvaluationResult
from evaluation.rois import LESION_GROUP, Roi

REFERENCE = "True Bl64d"
BASELINE = "Baseline (Br40d)"
ENGINE = "engine-a"
BONE = "HU [300, 800]"
FEATURES = ["original_glcm_Contrast", "original_firstorder_Mean", "gradient_firstorder_Mean"]
N_S1, N_S2, N_S2_BONE = 40, 12, 3


def _roi(subject: str, group: str, index: int) -> Roi:
    return Roi(subject, group, index % 3, float(index % 3), 0, 0, np.ones((4, 4), bool), "random")


def _tables() -> tuple[list[Roi], dict[str, npt.NDArray[np.float64]]]:
    """ROIs (S1: lesions and bone; S2: lesions and 3 bone ROIs) and feature tables per row."""
    rng = np.random.default_rng(7)
    rois = [_roi("S1", LESION_GROUP, i) for i in range(N_S1)]
    rois += [_roi("S1", BONE, i) for i in range(N_S1)]
    rois += [_roi("S2", LESION_GROUP, i) for i in range(N_S2)]
    rois += [_roi("S2", BONE, i) for i in range(N_S2_BONE)]
    n = len(rois)
    s1 = np.asarray([r.subject == "S1" for r in rois])
    reference = np.empty((n, len(FEATURES)))
    reference[s1] = rng.uniform(0.0, 100.0, (int(s1.sum()), len(FEATURES)))
    reference[~s1] = rng.uniform(49.0, 51.0, (int((~s1).sum()), len(FEATURES)))
    engine = reference + rng.normal(0.0, 0.5, reference.shape)
    engine[~s1] = 100.0 - reference[~s1]  # S2: runs against the reference (50 +- 1 -> 50 -+ 1)
    baseline = 0.8 * reference + rng.normal(0.0, 4.0, reference.shape)
    repeat = np.full_like(reference, np.nan)
    repeat[s1] = reference[s1] + rng.normal(0.0, 0.2, (int(s1.sum()), len(FEATURES)))
    return rois, {REFERENCE: reference, BASELINE: baseline, ENGINE: engine, REPEAT_ROW: repeat}


def _result(min_rois: int = 5) -> EvaluationResult:
    rois, features = _tables()
    groups = [LESION_GROUP, BONE]
    subject_rows = {"S1": [BASELINE, ENGINE, REPEAT_ROW], "S2": [BASELINE, ENGINE]}
    config = EvaluationConfig(data=(), out=Path("unused"), subject_min_rois=min_rois)
    subjects: list[dict[str, Any]] = []
    for label, spacing in (("S1", 0.703125), ("S2", 0.9375)):
        facts: dict[str, Any] = {
            "subject": label,
            "slices": 3,
            "matrix": [512, 512],
            "pixel_spacing_mm": [spacing, spacing],
            "source_kernel": "Br40d",
            "target_kernel": "Bl64d",
            "repeat_scan": label == "S1",
            "simulation": {"habitus": "large", "dose_factor": 0.35} if label == "S2" else {},
            "rois": {g: sum(1 for r in rois if (r.subject, r.group) == (label, g)) for g in groups},
        }
        facts["description"] = subject_description(facts, 20.0)
        subjects.append(facts)
    metrics = {
        "S1": {
            BASELINE: {"noise_sd_hu": 20.0, "nps_peak_lp_per_mm": 0.26},
            ENGINE: {"noise_sd_hu": 38.0, "nps_peak_lp_per_mm": 0.70},
            REPEAT_ROW: {"noise_sd_hu": 40.0, "nps_peak_lp_per_mm": 0.71},
            REFERENCE: {"noise_sd_hu": 40.0, "nps_peak_lp_per_mm": 0.70},
        },
        "S2": {
            BASELINE: {"noise_sd_hu": 20.0, "nps_peak_lp_per_mm": 0.22},
            ENGINE: {"noise_sd_hu": 60.0, "nps_peak_lp_per_mm": 0.50},
            REFERENCE: {"noise_sd_hu": 40.0, "nps_peak_lp_per_mm": 0.62},
        },
    }
    return EvaluationResult(
        config=config,
        row_names=[BASELINE, ENGINE, REPEAT_ROW],
        reference_name=REFERENCE,
        engines=[],
        rois=rois,
        feature_names=FEATURES,
        features=features,
        ccc=ccc_by_group(rois, features, REFERENCE, [BASELINE, ENGINE, REPEAT_ROW], groups),
        subject_ccc={
            label: ccc_by_group(
                rois, features, REFERENCE, rows, groups, subject=label, min_rois=min_rois
            )
            for label, rows in subject_rows.items()
        },
        image_metrics=metrics,
        nps={},
        data_summary={
            "subjects": subjects,
            "n_subjects": 2,
            "n_slices": 6,
            "source_kernel": "Br40d",
            "target_kernel": "Bl64d",
        },
        montage=None,
        timings_s={"total_s": 1.0, "read_engines_rois_s": 0.5, "radiomics_s": 0.5},
        notes=[],
    )


def test_per_subject_ccc_shows_the_subject_that_the_pooled_ccc_hides() -> None:
    result = _result()
    pooled = result.summaries()[LESION_GROUP][ENGINE]["all"]["mean"]
    per_subject = result.subject_summaries()
    s1 = per_subject["S1"][LESION_GROUP]["summary"][ENGINE]["all"]["mean"]
    s2 = per_subject["S2"][LESION_GROUP]["summary"][ENGINE]["all"]["mean"]
    assert pooled > 0.95, f"pooled CCC {pooled:.3f}: S1's spread should dominate"
    assert s1 > 0.99, f"S1 CCC {s1:.3f}"
    assert s2 < 0.0, f"S2 CCC {s2:.3f}: the candidate runs against the reference on S2"
    # the per-subject CCC is the plain CCC over that subject's ROIs, nothing else
    rois, features = _tables()
    mine = np.asarray([r.subject == "S2" and r.group == LESION_GROUP for r in rois])
    np.testing.assert_allclose(
        result.subject_ccc["S2"][LESION_GROUP][ENGINE],
        ccc_per_feature(features[REFERENCE][mine], features[ENGINE][mine]),
    )
    assert set(per_subject["S1"][LESION_GROUP]["summary"][ENGINE]) == {*FEATURE_CLASSES, "all"}


def test_a_subject_group_with_too_few_rois_is_reported_not_dropped() -> None:
    per_subject = _result(min_rois=5).subject_summaries()
    bone = per_subject["S2"][BONE]
    assert bone["too_few_rois"] is True
    assert bone["n_rois"] == {BASELINE: N_S2_BONE, ENGINE: N_S2_BONE}
    assert bone["summary"] == {BASELINE: None, ENGINE: None}
    assert per_subject["S1"][BONE]["too_few_rois"] is False
    assert _result(min_rois=3).subject_summaries()["S2"][BONE]["summary"][ENGINE] is not None


def test_the_ceiling_row_appears_only_for_subjects_with_a_repeat_scan() -> None:
    result = _result()
    per_subject = result.subject_summaries()
    assert REPEAT_ROW in per_subject["S1"][LESION_GROUP]["summary"]
    assert REPEAT_ROW not in per_subject["S2"][LESION_GROUP]["n_rois"]
    assert result.subject_rows("S2") == [BASELINE, ENGINE]
    # pooled, the repeat row's CCC is over S1's ROIs only (the ROIs it has)
    assert result.n_rois(LESION_GROUP, REPEAT_ROW) == N_S1
    assert result.n_rois(LESION_GROUP, ENGINE) == N_S1 + N_S2


def test_report_json_and_markdown_carry_the_per_subject_part() -> None:
    result = _result()
    report = json.loads(json.dumps(report_json(result)))  # what report.json holds
    assert set(report["per_subject"]) == {"S1", "S2"}
    assert report["per_subject"]["S2"][BONE]["summary"][ENGINE] is None
    assert report["per_subject"]["S2"][LESION_GROUP]["n_rois"][ENGINE] == N_S2
    assert report["settings"]["per_subject_ccc"]["min_rois"] == 5
    assert report["groups"][LESION_GROUP]["summary"][ENGINE]["all"]["mean"] > 0.95
    markdown = report_markdown(result, [])
    section = markdown[markdown.index("## Per subject") :]
    assert "### S2: pixel spacing 0.938 / 0.938 mm" in section
    assert "simulated habitus large, dose factor 0.35" in section
    assert "field of view 480 mm" in section
    assert "repeat-scan ceiling row exists only for the subjects" in section
    s2 = section[section.index("### S2") :]
    engine_line = next(line for line in s2.splitlines() if line.startswith(f"| {ENGINE} |"))
    # noise SD +50 % and NPS peak -19 % of the true target, lesion CCC negative, bone too few
    assert "| 60.0 | +50.0 % | 0.50 | -19.4 % | -" in engine_line, engine_line
    assert engine_line.endswith(f"| n/a ({N_S2_BONE} ROIs) |"), engine_line
    assert REPEAT_ROW not in s2
    assert f"| {REPEAT_ROW} |" in section[: section.index("### S2")]
