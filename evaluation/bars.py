"""`ltdiff-node bars REPORT.json`: check an engine against the acceptance bars of the learned
engine, from the `report.json` that `ltdiff-node evaluate` wrote. Nothing is recomputed: the
bars read the numbers of the report, so what they judge is what the report shows.

Bars (issue 9), for the candidate row (default "ltdiff++"):

1. above every baseline row (default: "linear-filter" and "unetpp-regression") in the
   all-feature mean CCC on every ROI group (lesions and each HU range), pooled over the subjects
   and for each subject on its own ROIs (`per_subject` of the report); a subject and group
   without a per-subject CCC (too few ROIs) fails, since the bar cannot be shown there;
2. within `margin` (0.03) of the repeat-scan ceiling in every feature class and group, pooled
   (being above the ceiling passes);
3. per subject, noise SD within `tolerance` (10 %) of the true target kernel's;
4. per subject, NPS peak frequency within `tolerance` of the true target kernel's.

`--per-class-above` replaces bar 1 by the bar of issue 4, which earlier model cards quote:
above every baseline in the mean CCC of every feature class, on every ROI group, pooled only.
That mode also reads reports written before per-subject evaluation existed.

"Above" is strict on the full-precision numbers of report.json; a tie does not pass. The
report's two-decimal tables can therefore show equal numbers for a failed bar: the table
printed here gives three decimals and the difference, and names every failure by its scope
(e.g. "S004 · lesion").

Exit code 0 when every bar passes, 1 when one fails (so a site's retraining pipeline can gate
on it), 2 for a report that does not hold the rows asked for.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from evaluation.labels import CLASS_TITLES, REPEAT_ROW

CEILING_ROW: Final = REPEAT_ROW
REFERENCE_ROW: Final = "True Bl64d"
"""The reference row of a Br40d -> Bl64d report (evaluate names it "True <target kernel>")."""


class ReportError(ValueError):
    """The report does not hold what the bars need (a row, a group, a metric)."""


AboveMode = Literal["all-features", "per-class"]
"""Bar 1 as issue 9 states it (all-feature mean, pooled and per subject) or as issue 4 did (every
feature class, pooled)."""
ABOVE_MODES: Final[tuple[AboveMode, ...]] = ("all-features", "per-class")
POOLED: Final = "pooled"
ALL_FEATURES: Final = "all"
"""The summaries' entry over every feature (`evaluation.ccc.summarize_by_class`)."""
_ITEM_TITLES: Final = {
    **CLASS_TITLES,
    "noise_sd_hu": "noise SD",
    "nps_peak_lp_per_mm": "NPS peak",
}


@dataclass(frozen=True)
class BarCheck:
    """One comparison: `value` of the candidate against `reference` under bar `bar`.

    scope: the line of the rendered table: an ROI group (pooled per-class bars), "pooled" or a
    subject (all-feature bars), a subject (image metrics). item: what varies within the line: a
    feature class, an ROI group or a metric. note: why a value is missing (e.g. too few ROIs).
    """

    bar: str  # "above <row> (all features)", "above <row>", "ceiling - margin", "noise SD", ...
    scope: str
    item: str
    value: float
    reference: float
    passed: bool
    note: str = ""

    @property
    def difference(self) -> float:
        return self.value - self.reference

    @property
    def where(self) -> str:
        """Scope and item, e.g. "S004 · lesion" or "lesion · GLCM"."""
        return f"{self.scope} · {_ITEM_TITLES.get(self.item, self.item)}"


def _mean(summary: Mapping[str, Any], cls: str) -> float:
    """A class mean of a summary; NaN where the report holds null (no defined CCC)."""
    try:
        value = summary[cls]["mean"]
    except (KeyError, TypeError) as exc:
        raise ReportError(f"CCC summary has no class {cls!r}") from exc
    return float("nan") if value is None else float(value)


def _summary(report: Mapping[str, Any], group: str, row: str) -> Mapping[str, Any]:
    try:
        summary: Mapping[str, Any] = report["groups"][group]["summary"][row]
    except KeyError as exc:
        raise ReportError(f"report has no CCC summary for row {row!r} in group {group!r}") from exc
    return summary


def _subject_entry(report: Mapping[str, Any], subject: str, group: str) -> Mapping[str, Any]:
    try:
        entry: Mapping[str, Any] = report["per_subject"][subject][group]
    except KeyError as exc:
        raise ReportError(
            f"report has no per-subject CCC of {subject!r} in group {group!r}"
        ) from exc
    return entry


def _above_per_subject(
    report: Mapping[str, Any], groups: Sequence[str], candidate: str, baselines: Sequence[str]
) -> list[BarCheck]:
    """Bar 1 per subject: the all-feature mean over the subject's own ROIs of each group."""
    if "per_subject" not in report:
        raise ReportError(
            "report has no per_subject CCC (written before per-subject evaluation): run "
            "`ltdiff-node evaluate` again, or check the issue-4 bars with --per-class-above"
        )
    checks: list[BarCheck] = []
    for row in baselines:
        for subject in report["per_subject"]:
            for group in groups:
                entry = _subject_entry(report, subject, group)
                summaries, n_rois = entry.get("summary", {}), entry.get("n_rois", {})
                for name in (candidate, row):
                    if name not in summaries:
                        raise ReportError(
                            f"report has no per-subject row {name!r} for {subject!r} in {group!r}"
                        )
                mine, theirs = summaries[candidate], summaries[row]
                if mine is None or theirs is None:
                    n = min(int(n_rois.get(candidate, 0)), int(n_rois.get(row, 0)))
                    nan = float("nan")
                    checks.append(
                        BarCheck(
                            f"above {row} (all features)",
                            subject,
                            group,
                            nan,
                            nan,
                            False,
                            f"{n} ROIs, too few for a CCC",
                        )
                    )
                    continue
                value, other = _mean(mine, ALL_FEATURES), _mean(theirs, ALL_FEATURES)
                checks.append(
                    BarCheck(
                        f"above {row} (all features)", subject, group, value, other, value > other
                    )
                )
    return checks


def check_bars(
    report: Mapping[str, Any],
    *,
    candidate: str = "ltdiff++",
    baselines: Sequence[str] = ("linear-filter", "unetpp-regression"),
    ceiling: str = CEILING_ROW,
    reference: str = REFERENCE_ROW,
    margin: float = 0.03,
    tolerance: float = 0.10,
    above: AboveMode = "all-features",
) -> list[BarCheck]:
    """Every comparison of the four bars (module docstring), in report order.

    above: "all-features" (issue 9: all-feature mean, pooled and per subject) or "per-class"
    (issue 4: every feature class, pooled)."""
    if above not in ABOVE_MODES:
        raise ValueError(f"above={above!r}: allowed {', '.join(ABOVE_MODES)}")
    classes = list(report.get("feature_classes", []))
    if not classes:
        raise ReportError("report has no feature_classes")
    groups = list(report.get("groups", {}))
    checks: list[BarCheck] = []
    if above == "all-features":
        for row in baselines:
            for group in groups:
                value = _mean(_summary(report, group, candidate), ALL_FEATURES)
                other = _mean(_summary(report, group, row), ALL_FEATURES)
                checks.append(
                    BarCheck(
                        f"above {row} (all features)", POOLED, group, value, other, value > other
                    )
                )
        checks += _above_per_subject(report, groups, candidate, baselines)
    for group in groups:
        mine = _summary(report, group, candidate)
        if above == "per-class":
            for row in baselines:
                theirs = _summary(report, group, row)
                for cls in classes:
                    value, other = _mean(mine, cls), _mean(theirs, cls)
                    checks.append(BarCheck(f"above {row}", group, cls, value, other, value > other))
        top = _summary(report, group, ceiling)
        for cls in classes:
            value, best = _mean(mine, cls), _mean(top, cls)
            checks.append(
                BarCheck(f"ceiling - {margin:g}", group, cls, value, best, value >= best - margin)
            )
    for subject, rows in report.get("image_metrics", {}).items():
        if subject.startswith("all") or candidate not in rows or reference not in rows:
            continue
        for key, label in (("noise_sd_hu", "noise SD"), ("nps_peak_lp_per_mm", "NPS peak")):
            mine_value, true_value = rows[candidate].get(key), rows[reference].get(key)
            value = float("nan") if mine_value is None else float(mine_value)
            truth = float("nan") if true_value is None else float(true_value)
            ok = abs(value - truth) <= tolerance * abs(truth)
            checks.append(BarCheck(label, subject, key, value, truth, ok))
    if not checks:
        raise ReportError("report has no groups or image metrics to check")
    return checks


def _number(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else "n/a"


def _failure(check: BarCheck) -> str:
    text = f"{check.where} {_number(check.value)} vs {_number(check.reference)}"
    if math.isfinite(check.difference):
        text += f" ({check.difference:+.3f})"
    return text + (f" ({check.note})" if check.note else "")


def render(checks: Sequence[BarCheck], candidate: str) -> str:
    """Markdown: one line per bar and scope with the failures spelled out, then a verdict."""
    lines = [f"# Bars for {candidate}", "", "| Bar | Scope | Passed | Failed (value vs ref) |"]
    lines.append("| --- | --- | ---: | --- |")
    keys = list(dict.fromkeys((c.bar, c.scope) for c in checks))
    for bar, scope in keys:
        mine = [c for c in checks if (c.bar, c.scope) == (bar, scope)]
        failed = ", ".join(_failure(c) for c in mine if not c.passed)
        lines.append(
            f"| {bar} | {scope} | {sum(c.passed for c in mine)}/{len(mine)} | {failed or '—'} |"
        )
    n_failed = sum(not c.passed for c in checks)
    verdict = "all bars pass" if n_failed == 0 else f"{n_failed} of {len(checks)} checks fail"
    lines += ["", f"**{verdict}**", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ltdiff-node bars",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("report", type=Path, help="report.json from `ltdiff-node evaluate`")
    parser.add_argument("--candidate", default="ltdiff++", help="row under test")
    parser.add_argument(
        "--baseline",
        action="append",
        help="row the candidate must beat (repeatable; default linear-filter, unetpp-regression)",
    )
    parser.add_argument("--margin", type=float, default=0.03, help="allowed gap to the ceiling")
    parser.add_argument("--tolerance", type=float, default=0.10, help="noise SD / NPS peak")
    parser.add_argument(
        "--per-class-above",
        action="store_const",
        const="per-class",
        default="all-features",
        dest="above",
        help="bar 1 as in issue 4: above the baselines in every feature class, pooled only "
        "(default: issue 9, all-feature mean, pooled and per subject)",
    )
    args = parser.parse_args(argv)
    try:
        report = json.loads(args.report.read_text())
        checks = check_bars(
            report,
            candidate=args.candidate,
            baselines=tuple(args.baseline or ("linear-filter", "unetpp-regression")),
            margin=args.margin,
            tolerance=args.tolerance,
            above=args.above,
        )
    except (OSError, json.JSONDecodeError, ReportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(render(checks, args.candidate))
    return 0 if all(c.passed for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
