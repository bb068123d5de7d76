"""`ltdiff-node bars REPORT.json`: check an engine against the acceptance bars of the learned
engine (issue 4), from the `report.json` that `ltdiff-node evaluate` wrote. Nothing is
recomputed: the bars read the numbers of the report, so what they judge is what the report shows.

Bars, for the candidate row (default "ltdiff++"):

1. above every baseline row (default: "linear-filter" and "unetpp-regression") in mean CCC, for
   every feature class, on every ROI group (lesions and each HU range);
2. within `margin` (0.03) of the repeat-scan ceiling in every class and group (being above the
   ceiling passes);
3. per subject, noise SD within `tolerance` (10 %) of the true target kernel's;
4. per subject, NPS peak frequency within `tolerance` of the true target kernel's.

"Above" is strict on the full-precision numbers of report.json; a tie does not pass. The
report's two-decimal tables can therefore show equal numbers for a failed bar: the table
printed here gives three decimals and the difference.

Exit code 0 when every bar passes, 1 when one fails (so a site's retraining pipeline can gate
on it), 2 for a report that does not hold the rows asked for.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from training.eval_report import CLASS_TITLES
from training.evaluate import REPEAT_ROW

CEILING_ROW: Final = REPEAT_ROW
REFERENCE_ROW: Final = "True Bl64d"
"""The reference row of a Br40d -> Bl64d report (evaluate names it "True <target kernel>")."""


class ReportError(ValueError):
    """The report does not hold what the bars need (a row, a group, a metric)."""


@dataclass(frozen=True)
class BarCheck:
    """One comparison: `value` of the candidate against `reference` under bar `bar`."""

    bar: str  # "above <row>", "ceiling - margin", "noise SD", "NPS peak"
    scope: str  # ROI group or subject
    item: str  # feature class or metric
    value: float
    reference: float
    passed: bool

    @property
    def difference(self) -> float:
        return self.value - self.reference


def _summary(report: Mapping[str, Any], group: str, row: str) -> Mapping[str, Any]:
    try:
        summary: Mapping[str, Any] = report["groups"][group]["summary"][row]
    except KeyError as exc:
        raise ReportError(f"report has no CCC summary for row {row!r} in group {group!r}") from exc
    return summary


def check_bars(
    report: Mapping[str, Any],
    *,
    candidate: str = "ltdiff++",
    baselines: Sequence[str] = ("linear-filter", "unetpp-regression"),
    ceiling: str = CEILING_ROW,
    reference: str = REFERENCE_ROW,
    margin: float = 0.03,
    tolerance: float = 0.10,
) -> list[BarCheck]:
    """Every comparison of the four bars (module docstring), in report order."""
    classes = list(report.get("feature_classes", []))
    if not classes:
        raise ReportError("report has no feature_classes")
    checks: list[BarCheck] = []
    for group in report.get("groups", {}):
        mine = _summary(report, group, candidate)
        for row in baselines:
            theirs = _summary(report, group, row)
            for cls in classes:
                value, other = float(mine[cls]["mean"]), float(theirs[cls]["mean"])
                checks.append(BarCheck(f"above {row}", group, cls, value, other, value > other))
        top = _summary(report, group, ceiling)
        for cls in classes:
            value, best = float(mine[cls]["mean"]), float(top[cls]["mean"])
            checks.append(
                BarCheck(f"ceiling - {margin:g}", group, cls, value, best, value >= best - margin)
            )
    for subject, rows in report.get("image_metrics", {}).items():
        if subject.startswith("all") or candidate not in rows or reference not in rows:
            continue
        for key, label in (("noise_sd_hu", "noise SD"), ("nps_peak_lp_per_mm", "NPS peak")):
            value, truth = float(rows[candidate][key]), float(rows[reference][key])
            ok = abs(value - truth) <= tolerance * abs(truth)
            checks.append(BarCheck(label, subject, key, value, truth, ok))
    if not checks:
        raise ReportError("report has no groups or image metrics to check")
    return checks


def render(checks: Sequence[BarCheck], candidate: str) -> str:
    """Markdown: one line per bar and scope with the failures spelled out, then a verdict."""
    lines = [f"# Bars for {candidate}", "", "| Bar | Scope | Passed | Failed (value vs ref) |"]
    lines.append("| --- | --- | ---: | --- |")
    keys = list(dict.fromkeys((c.bar, c.scope) for c in checks))
    for bar, scope in keys:
        mine = [c for c in checks if (c.bar, c.scope) == (bar, scope)]
        failed = ", ".join(
            f"{CLASS_TITLES.get(c.item, c.item)} {c.value:.3f} vs {c.reference:.3f} "
            f"({c.difference:+.3f})"
            for c in mine
            if not c.passed
        )
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
    args = parser.parse_args(argv)
    try:
        report = json.loads(args.report.read_text())
        checks = check_bars(
            report,
            candidate=args.candidate,
            baselines=tuple(args.baseline or ("linear-filter", "unetpp-regression")),
            margin=args.margin,
            tolerance=args.tolerance,
        )
    except (OSError, json.JSONDecodeError, ReportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(render(checks, args.candidate))
    return 0 if all(c.passed for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
