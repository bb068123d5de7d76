"""Acceptance bars read from an evaluation report (evaluation/bars.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from dicom_node.cli import main as cli_main
from evaluation.bars import ReportError, check_bars, main, render

CLASSES = ["glcm", "ngtdm"]
GROUPS = ["lesion", "HU [10, 250]"]
SUBJECTS = ["S004", "S005"]
ROWS = {
    "linear-filter": {"glcm": 0.90, "ngtdm": 0.95, "all": 0.92},
    "unetpp-regression": {"glcm": 0.91, "ngtdm": 0.94, "all": 0.93},
    "ltdiff++": {"glcm": 0.95, "ngtdm": 0.96, "all": 0.955},
    "Repeat scan (ceiling)": {"glcm": 0.96, "ngtdm": 0.97, "all": 0.965},
}


def _summary() -> dict[str, Any]:
    return {row: {c: {"mean": v} for c, v in means.items()} for row, means in ROWS.items()}


def _report() -> dict[str, Any]:
    """Pooled summaries, per-subject summaries (the same numbers) and image metrics that pass
    every bar."""
    metrics = {
        "ltdiff++": {"noise_sd_hu": 36.0, "nps_peak_lp_per_mm": 0.74},
        "True Bl64d": {"noise_sd_hu": 38.4, "nps_peak_lp_per_mm": 0.70},
    }
    per_subject = {
        subject: {
            group: {"n_rois": dict.fromkeys(ROWS, 40), "too_few_rois": False, "summary": _summary()}
            for group in GROUPS
        }
        for subject in SUBJECTS
    }
    return {
        "feature_classes": CLASSES,
        "groups": {group: {"summary": _summary()} for group in GROUPS},
        "per_subject": per_subject,
        "image_metrics": {
            **{s: copy.deepcopy(metrics) for s in SUBJECTS},
            "all (pooled)": copy.deepcopy(metrics),
        },
    }


def test_a_candidate_above_baselines_near_the_ceiling_with_true_noise_passes() -> None:
    checks = check_bars(_report())
    # above: 2 baselines x 2 groups x (pooled + 2 subjects) all-feature means; ceiling: 2 groups
    # x 2 classes; image metrics: 2 subjects x 2 ("all (pooled)" skipped)
    assert len(checks) == 12 + 4 + 4
    assert all(c.passed for c in checks)
    assert {c.scope for c in checks if c.bar == "above linear-filter (all features)"} == {
        "pooled",
        *SUBJECTS,
    }
    assert "all bars pass" in render(checks, "ltdiff++")


def test_one_subject_below_a_baseline_fails_although_the_pooled_numbers_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = _report()
    report["per_subject"]["S005"]["lesion"]["summary"]["ltdiff++"]["all"]["mean"] = 0.925
    checks = check_bars(report)
    failed = [c for c in checks if not c.passed]
    assert [(c.bar, c.scope, c.item) for c in failed] == [
        ("above unetpp-regression (all features)", "S005", "lesion")
    ], "0.925 is above linear-filter's 0.92 but below unetpp-regression's 0.93 on S005 lesions"
    assert all(c.passed for c in checks if c.scope == "pooled")
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    assert main([str(path)]) == 1
    text = capsys.readouterr().out
    assert "S005 · lesion 0.925 vs 0.930 (-0.005)" in text, text
    assert "1 of 20 checks fail" in text


def test_a_subject_group_too_small_for_a_ccc_fails_the_bar_and_says_why() -> None:
    report = _report()
    entry = report["per_subject"]["S004"]["HU [10, 250]"]
    entry["n_rois"] = dict.fromkeys(ROWS, 3)
    entry["too_few_rois"] = True
    entry["summary"] = dict.fromkeys(ROWS)  # null in report.json
    failed = [c for c in check_bars(report) if not c.passed]
    assert {(c.bar, c.scope, c.item) for c in failed} == {
        ("above linear-filter (all features)", "S004", "HU [10, 250]"),
        ("above unetpp-regression (all features)", "S004", "HU [10, 250]"),
    }
    assert "S004 · HU [10, 250] n/a vs n/a (3 ROIs, too few for a CCC)" in render(
        failed, "ltdiff++"
    )


def test_a_report_without_per_subject_ccc_needs_the_per_class_option(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = _report()
    del report["per_subject"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(report))
    assert main([str(path)]) == 2
    assert "--per-class-above" in capsys.readouterr().err
    assert main([str(path), "--per-class-above"]) == 0


def test_per_class_option_checks_every_class_pooled_as_issue_4_did() -> None:
    report = _report()
    for summary in (
        report["groups"]["lesion"]["summary"],
        *(report["per_subject"][s]["lesion"]["summary"] for s in SUBJECTS),
    ):
        summary["ltdiff++"]["ngtdm"]["mean"] = 0.945  # below linear-filter's 0.95 in one class
    assert all(c.passed for c in check_bars(report)), "the all-feature mean is still above"
    checks = check_bars(report, above="per-class")
    # 2 groups x (2 baselines + ceiling) x 2 classes + 2 subjects x 2 metrics
    assert len(checks) == 16
    assert {(c.bar, c.scope, c.item) for c in checks if not c.passed} == {
        ("above linear-filter", "lesion", "ngtdm")
    }


def test_each_bar_fails_on_its_own_numbers() -> None:
    report = _report()
    lesion = report["groups"]["lesion"]["summary"] = copy.deepcopy(
        report["groups"]["lesion"]["summary"]
    )
    lesion["ltdiff++"]["ngtdm"]["mean"] = 0.95  # a tie with linear-filter: not above
    lesion["ltdiff++"]["glcm"]["mean"] = 0.92  # above both baselines, 0.04 below the ceiling
    report["image_metrics"]["S004"]["ltdiff++"]["nps_peak_lp_per_mm"] = 0.60  # -14 %
    failed = {
        (c.bar, c.scope, c.item) for c in check_bars(report, above="per-class") if not c.passed
    }
    assert failed == {
        ("above linear-filter", "lesion", "ngtdm"),
        ("ceiling - 0.03", "lesion", "glcm"),
        ("NPS peak", "S004", "nps_peak_lp_per_mm"),
    }
    text = render(check_bars(report, above="per-class"), "ltdiff++")
    assert "lesion · NGTDM 0.950 vs 0.950 (+0.000)" in text and "3 of 16 checks fail" in text


def test_a_missing_row_is_a_report_error() -> None:
    with pytest.raises(ReportError, match="'no-such-engine'"):
        check_bars(_report(), baselines=("no-such-engine",))


def test_cli_exit_codes_gate_a_retraining_pipeline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_report()))
    assert cli_main(["bars", str(good)]) == 0
    assert "all bars pass" in capsys.readouterr().out
    assert main([str(good), "--margin", "0.0"]) == 1  # 0.95 < 0.96 ceiling with no margin
    assert main([str(good), "--per-class-above"]) == 0
    assert main([str(tmp_path / "missing.json")]) == 2
    assert "error:" in capsys.readouterr().err
