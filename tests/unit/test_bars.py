"""Acceptance bars read from an evaluation report (training/bars.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from dicom_node.cli import main as cli_main
from training.bars import ReportError, check_bars, main, render

CLASSES = ["glcm", "ngtdm"]
ROWS = {
    "linear-filter": {"glcm": 0.90, "ngtdm": 0.95},
    "unetpp-regression": {"glcm": 0.91, "ngtdm": 0.94},
    "ltdiff++": {"glcm": 0.95, "ngtdm": 0.96},
    "Repeat scan (ceiling)": {"glcm": 0.96, "ngtdm": 0.97},
}


def _report() -> dict[str, Any]:
    summary = {row: {c: {"mean": v} for c, v in means.items()} for row, means in ROWS.items()}
    metrics = {
        "ltdiff++": {"noise_sd_hu": 36.0, "nps_peak_lp_per_mm": 0.74},
        "True Bl64d": {"noise_sd_hu": 38.4, "nps_peak_lp_per_mm": 0.70},
    }
    return {
        "feature_classes": CLASSES,
        "groups": {"lesion": {"summary": summary}, "HU [10, 250]": {"summary": summary}},
        "image_metrics": {"S004": metrics, "all (pooled)": metrics},
    }


def test_a_candidate_above_baselines_near_the_ceiling_with_true_noise_passes() -> None:
    checks = check_bars(_report())
    # 2 groups x (2 baselines + ceiling) x 2 classes + 1 subject x 2 metrics ("all" skipped)
    assert len(checks) == 14
    assert all(c.passed for c in checks)
    assert "all bars pass" in render(checks, "ltdiff++")


def test_each_bar_fails_on_its_own_numbers() -> None:
    report = _report()
    lesion = report["groups"]["lesion"]["summary"] = copy.deepcopy(
        report["groups"]["lesion"]["summary"]
    )
    lesion["ltdiff++"]["ngtdm"]["mean"] = 0.95  # a tie with linear-filter: not above
    lesion["ltdiff++"]["glcm"]["mean"] = 0.92  # above both baselines, 0.04 below the ceiling
    report["image_metrics"]["S004"] = copy.deepcopy(report["image_metrics"]["S004"])
    report["image_metrics"]["S004"]["ltdiff++"]["nps_peak_lp_per_mm"] = 0.60  # -14 %
    failed = {(c.bar, c.scope, c.item) for c in check_bars(report) if not c.passed}
    assert failed == {
        ("above linear-filter", "lesion", "ngtdm"),
        ("ceiling - 0.03", "lesion", "glcm"),
        ("NPS peak", "S004", "nps_peak_lp_per_mm"),
    }
    text = render(check_bars(report), "ltdiff++")
    assert "NGTDM 0.950 vs 0.950 (+0.000)" in text and "3 of 14 checks fail" in text


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
    assert main([str(tmp_path / "missing.json")]) == 2
    assert "error:" in capsys.readouterr().err
