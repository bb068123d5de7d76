"""The evaluation report: Markdown table, JSON with every number, PNG figures.

`write_report(result, out_dir)` writes `report.md`, `report.json` and `figures/` (CCC per class
per row as grouped bars, an image montage, NPS curves) and returns the paths written.

Both carry the pooled tables (CCC over the ROIs of all subjects) and a per-subject part: each
subject's pixel spacing and a one-line description, the noise SD and NPS peak of every row beside
the true target, and the all-feature mean CCC of every row per ROI group over the subject's own
ROIs (`report.json`: `per_subject`, every class).
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np

mpl.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt
from matplotlib.patches import Rectangle

from evaluation.labels import CLASS_TITLES
from evaluation.radiomics_features import FEATURE_CLASSES, feature_class
from evaluation.results import EvaluationResult
from evaluation.rois import LESION_GROUP

LUNG_WINDOW = (-600.0, 1500.0)
SOFT_TISSUE_WINDOW = (40.0, 400.0)
DIFFERENCE_RANGE_HU = 100.0
ZOOM_HALF_PX = 40


def _group_title(group: str) -> str:
    return "Lesion ROIs" if group == LESION_GROUP else f"Random ROIs, {group}"


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf to null, numpy scalars and arrays to Python."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, np.generic):
        return _clean(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return value.name
    return value


def _fmt(value: float, digits: int = 2) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("ltdiff-node", "pyradiomics", "numpy", "pydicom", "SimpleITK", "scipy"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def report_json(result: EvaluationResult) -> dict[str, Any]:
    """Every number of the run, JSON-ready."""
    summaries = result.summaries()
    groups: dict[str, Any] = {}
    for group in result.groups:
        skipped = result.skipped_features(group)
        groups[group] = {
            "n_rois": {row: result.n_rois(group, row) for row in result.row_names},
            "skipped_features": {"count": len(skipped), "names": skipped},
            "summary": summaries[group],
            "ccc_per_feature": {
                row: dict(zip(result.feature_names, result.ccc[group][row].tolist(), strict=True))
                for row in result.row_names
            },
        }
    nps_curves: dict[str, Any] = {}
    for subject, per_row in result.nps.items():
        nps_curves[subject] = {}
        for row, acc in per_row.items():
            r = acc.result()
            nps_curves[subject][row] = {
                "nps_hu2_mm2": r.nps,
                "peak_lp_per_mm": r.peak_lp_per_mm,
                "integral_hu2": r.integral_hu2,
                "n_patches": r.n_patches,
            }
    frequency = next(
        (acc.result().frequency_lp_per_mm for per in result.nps.values() for acc in per.values()),
        np.zeros(0),
    )
    rois = [
        {
            "subject": r.subject,
            "group": r.group,
            "z_mm": r.z_mm,
            "box": [r.row0, r.col0, *r.mask.shape],
            "n_pixels": r.n_pixels,
            "origin": r.origin,
        }
        for r in result.rois
    ]
    report: dict[str, Any] = _clean(
        {
            "title": "ltdiff-node evaluation: radiomic feature agreement and image metrics",
            "reference": result.reference_name,
            "rows": result.row_names,
            "engines": result.engines,
            "feature_classes": list(FEATURE_CLASSES),
            "features": [{"name": n, "class": feature_class(n)} for n in result.feature_names],
            "settings": result.config.describe(),
            "software": _versions(),
            "data": result.data_summary,
            "groups": groups,
            "per_subject": result.subject_summaries(),
            "image_metrics": result.image_metrics,
            "nps": {"frequency_lp_per_mm": frequency, "curves": nps_curves},
            "rois": rois,
            "timings_s": result.timings_s,
            "notes": result.notes,
        }
    )
    return report


def report_markdown(result: EvaluationResult, figures: Sequence[Path]) -> str:
    """The Markdown report: data, engines, settings, CCC tables per ROI group, image metrics."""
    summaries = result.summaries()
    data = result.data_summary
    subjects = data["subjects"]
    spacings = sorted({f"{s['pixel_spacing_mm'][0]:.3f}" for s in subjects})
    settings = result.config.describe()
    radiomics = settings["radiomics"]
    lines = [
        "# Radiomic feature agreement with the true target kernel",
        "",
        f"Reference: **{result.reference_name}** (the true target-kernel series of each subject). "
        f"Subjects: {', '.join(s['subject'] for s in subjects)} ({data['n_slices']} paired "
        f"slices, {data['source_kernel']} → {data['target_kernel']}, pixel spacing "
        f"{', '.join(spacings)} mm). "
        f"Repeat scan (ceiling) available for: "
        f"{', '.join(s['subject'] for s in subjects if s['repeat_scan']) or 'none'}.",
        "",
        "Engines:",
        "",
    ]
    for e in result.engines:
        lines.append(
            f"- `{e['row']}`: {e['name']} {e['version']}, weights {e['weights_file']} "
            f"sha256 `{e['weights_sha256'][:16]}…`, {e['source_kernel']} → {e['target_kernel']}"
            + (f", {e['settings']}" if e.get("settings") else "")
            + (f", denoiser in {e['denoiser_dtype']}" if e.get("denoiser_dtype") else "")
        )
    lines += [
        "",
        f"PyRadiomics {radiomics['pyradiomics_version']}, 2-D (force2D), fixed bin width "
        f"{radiomics['bin_width_hu']:g} HU (gradient image: "
        f"{radiomics['gradient_bin_width_hu_per_mm']:g} HU/mm), no resampling or normalization; "
        f"{len(result.feature_names)} features. ROI seed {settings['seed']}; "
        f"{settings['hu_range_rois']['per_subject_and_range']} random "
        f"{settings['hu_range_rois']['window_px']}-px windows per subject and HU range; lesion "
        f"ROIs = nodule truth masks with ≥ {settings['lesion_rois']['min_pixels']} px per slice. "
        "CCC = Lin's concordance correlation coefficient of each feature across ROIs against "
        f"the {result.reference_name} value; cells: mean ± SD over the features of a class; "
        "≥0.85 / ≥0.90: share of all features reaching the threshold.",
        "",
        "## CCC per feature class",
        "",
        "Pooled over the ROIs of all subjects (per subject: section “Per subject”). The "
        "repeat-scan ceiling row exists only for the subjects with a repeat scan, so its CCC is "
        "over their ROIs only (its ROIs column).",
        "",
    ]
    header_classes = [*FEATURE_CLASSES, "all"]
    for group in result.groups:
        skipped = result.skipped_features(group)
        lines += [f"### {_group_title(group)}", ""]
        lines.append(
            "| Row | ROIs | "
            + " | ".join(CLASS_TITLES[c] for c in header_classes)
            + " | ≥0.85 | ≥0.90 |"
        )
        lines.append(
            "| --- | ---: | " + " | ".join("---" for _ in header_classes) + " | ---: | ---: |"
        )
        for row in result.row_names:
            s = summaries[group][row]
            cells = [f"{_fmt(s[c]['mean'])} ± {_fmt(s[c]['sd'])}" for c in header_classes]
            lines.append(
                f"| {row} | {result.n_rois(group, row)} | "
                + " | ".join(cells)
                + f" | {_fmt(100 * s['all']['share_085'], 0)} % | "
                f"{_fmt(100 * s['all']['share_090'], 0)} % |"
            )
        lines += [
            "",
            f"Skipped (constant across these ROIs in the reference, CCC undefined): "
            f"{len(skipped)} of {len(result.feature_names)}"
            + (f" ({', '.join(skipped)})" if skipped else "")
            + ".",
            "",
        ]
    lines += ["## Share of features with CCC ≥ 0.85 / ≥ 0.90, per class", ""]
    lines.append("| ROIs | Row | " + " | ".join(CLASS_TITLES[c] for c in FEATURE_CLASSES) + " |")
    lines.append("| --- | --- | " + " | ".join("---" for _ in FEATURE_CLASSES) + " |")
    for group in result.groups:
        for row in result.row_names:
            s = summaries[group][row]
            cells = [
                f"{_fmt(100 * s[c]['share_085'], 0)} / {_fmt(100 * s[c]['share_090'], 0)} %"
                for c in FEATURE_CLASSES
            ]
            lines.append(f"| {group} | {row} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Image metrics",
        "",
        f"MAE and RMSE against {result.reference_name} inside the body (largest region above "
        "-500 HU with lungs filled); noise SD: median over slices of the SD in the uniform "
        "region (truth `uniform_roi`, heart blood pool); NPS from quadratically detrended "
        f"{settings['nps']['patch_px']}-px patches inside the uniform region (50 % overlap), "
        "peak frequency of the radial curve and its 2-D integral (= noise variance).",
        "",
        "| Subject | Row | MAE (HU) | RMSE (HU) | Noise SD (HU) | NPS peak (lp/mm) | "
        "NPS integral (HU²) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    metric_rows = [*result.row_names, result.reference_name]
    for subject in [*(s["subject"] for s in subjects), "all"]:
        metrics = result.image_metrics.get(subject, {})
        for row in metric_rows:
            m = metrics.get(row)
            if not m:
                continue
            noise = m.get("noise_sd_hu", m.get("noise_sd_hu_mean_of_subjects", float("nan")))
            lines.append(
                f"| {subject if subject != 'all' else 'all (pooled)'} | {row} | "
                f"{_fmt(m.get('mae_hu', float('nan')), 1)} | "
                f"{_fmt(m.get('rmse_hu', float('nan')), 1)} | {_fmt(noise, 1)} | "
                f"{_fmt(m.get('nps_peak_lp_per_mm', float('nan')), 2)} | "
                f"{_fmt(m.get('nps_integral_hu2', float('nan')), 0)} |"
            )
    lines += ["", "(“all” noise SD: mean of the subjects' medians.)", ""]
    lines += _per_subject_markdown(result)
    if figures:
        lines += ["## Figures", ""]
        lines += [f"![{p.stem}](figures/{p.name})" for p in figures]
        lines.append("")
    t = result.timings_s
    lines += [
        "## Run",
        "",
        f"Runtime {t['total_s']:.0f} s (reading, engines, ROIs {t['read_engines_rois_s']:.0f} s; "
        f"PyRadiomics {t['radiomics_s']:.0f} s with {result.config.workers} worker process(es)). "
        "Every number is in `report.json`.",
        "",
    ]
    if result.notes:
        lines += ["Notes:", "", *(f"- {n}" for n in result.notes), ""]
    return "\n".join(lines)


def _relative(value: Any, truth: Any) -> str:
    """`value` as a signed percentage of `truth` ("n/a" where either is missing)."""
    if not isinstance(value, int | float) or not isinstance(truth, int | float):
        return "n/a"
    if not (math.isfinite(value) and math.isfinite(truth)) or truth == 0:
        return "n/a"
    return f"{100.0 * (value - truth) / truth:+.1f} %"


def _per_subject_markdown(result: EvaluationResult) -> list[str]:
    """The "Per subject" section: per subject a description line and one table with the noise
    SD and NPS peak of every row beside the true target, and the all-feature mean CCC per ROI
    group over the subject's own ROIs."""
    per_subject = result.subject_summaries()
    minimum = result.config.subject_min_rois
    reference = result.reference_name
    lines = [
        "## Per subject",
        "",
        "The same numbers per subject: noise SD and NPS peak of every row beside "
        f"{reference} (difference in % of {reference}), and the all-feature mean CCC per ROI "
        "group computed over the subject's own ROIs only (every class is in `report.json`, "
        f"`per_subject`). A group with fewer than {minimum} ROIs of a subject gets no CCC "
        "(“n/a (k ROIs)”). The repeat-scan ceiling row exists only for the subjects that have a "
        "repeat scan, and its pooled CCC is over those subjects' ROIs only.",
        "",
    ]
    for facts in result.data_summary["subjects"]:
        subject = facts["subject"]
        spacing = facts["pixel_spacing_mm"]
        metrics = result.image_metrics.get(subject, {})
        truth = metrics.get(reference, {})
        rois = facts.get("rois", {})
        lines += [
            f"### {subject}: pixel spacing {spacing[0]:.3f} / {spacing[1]:.3f} mm",
            "",
            facts.get("description", ""),
            "",
            "| Row | Noise SD (HU) | vs true | NPS peak (lp/mm) | vs true | "
            + " | ".join(
                f"{'Lesions' if g == LESION_GROUP else g} ({rois.get(g, 0)} ROIs)"
                for g in result.groups
            )
            + " |",
            "| --- | ---: | ---: | ---: | ---: | "
            + " | ".join("---:" for _ in result.groups)
            + " |",
        ]
        for row in [*result.subject_rows(subject), reference]:
            m = metrics.get(row, {})
            noise, peak = m.get("noise_sd_hu"), m.get("nps_peak_lp_per_mm")
            cells = [
                _fmt(noise if isinstance(noise, float) else float("nan"), 1),
                "—" if row == reference else _relative(noise, truth.get("noise_sd_hu")),
                _fmt(peak if isinstance(peak, float) else float("nan"), 2),
                "—" if row == reference else _relative(peak, truth.get("nps_peak_lp_per_mm")),
            ]
            for group in result.groups:
                entry = per_subject[subject][group]
                if row == reference:
                    cells.append("—")
                elif entry["summary"].get(row) is None:
                    cells.append(f"n/a ({entry['n_rois'].get(row, 0)} ROIs)")
                else:
                    cells.append(_fmt(entry["summary"][row]["all"]["mean"]))
            lines.append(f"| {row} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _window(image: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    centre, width = window
    return np.clip((image - (centre - width / 2)) / width, 0.0, 1.0)


def figure_ccc_bars(result: EvaluationResult, path: Path) -> Path:
    """Grouped bars: mean CCC (± SD over features) per class, one bar per row, per ROI group."""
    summaries = result.summaries()
    groups = result.groups
    classes = [*FEATURE_CLASSES, "all"]
    ncols = min(3, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.2 * ncols, 4.2 * nrows), squeeze=False)
    colours = plt.get_cmap("tab10")
    width = 0.8 / max(1, len(result.row_names))
    x = np.arange(len(classes))
    for ax, group in zip(axes.ravel(), groups, strict=False):
        for k, row in enumerate(result.row_names):
            s = summaries[group][row]
            means = [s[c]["mean"] for c in classes]
            sds = [s[c]["sd"] for c in classes]
            ax.bar(
                x + (k - (len(result.row_names) - 1) / 2) * width,
                means,
                width,
                yerr=sds,
                capsize=2,
                color=colours(k),
                label=row,
            )
        for level, style in ((0.85, "--"), (0.90, ":")):
            ax.axhline(level, color="0.3", linestyle=style, linewidth=0.9)
        ax.set_xticks(x, [CLASS_TITLES[c] for c in classes], rotation=35, ha="right")
        ax.set_ylim(
            min(
                0.0,
                *(
                    summaries[group][r][c]["mean"]
                    for r in result.row_names
                    for c in classes
                    if math.isfinite(summaries[group][r][c]["mean"])
                ),
            ),
            1.05,
        )
        ax.set_ylabel("Lin's CCC (mean ± SD over features)")
        n = result.n_rois(group, result.row_names[0])
        ax.set_title(f"{_group_title(group)} ({n} ROIs)")
    handles, labels = axes.ravel()[0].get_legend_handles_labels()
    for ax in axes.ravel()[len(groups) :]:
        ax.axis("off")
    fig.suptitle(
        f"Feature agreement with {result.reference_name} per class (dashed 0.85, dotted 0.90)"
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def figure_montage(result: EvaluationResult, path: Path) -> Path | None:
    """Source | engines | true target | engine - target, in lung and soft-tissue windows and a
    zoom on a lesion."""
    montage = result.montage
    if montage is None:
        return None
    images: dict[str, np.ndarray] = montage["images"]
    reference = images[montage["reference"]]
    columns = [
        (name, images[name], False)
        for name in [montage["baseline"], *montage["engines"], montage["reference"]]
    ]
    columns += [
        (f"{name} - {montage['reference']}", images[name] - reference, True)
        for name in montage["engines"]
    ]
    r, c = montage["centre"]
    rows_n, cols_n = reference.shape
    r0, c0 = (
        int(np.clip(r - ZOOM_HALF_PX, 0, rows_n - 2 * ZOOM_HALF_PX)),
        int(np.clip(c - ZOOM_HALF_PX, 0, cols_n - 2 * ZOOM_HALF_PX)),
    )
    zoom = (slice(r0, r0 + 2 * ZOOM_HALF_PX), slice(c0, c0 + 2 * ZOOM_HALF_PX))
    row_defs = [
        (f"lung window (L {LUNG_WINDOW[0]:g} / W {LUNG_WINDOW[1]:g})", LUNG_WINDOW, None),
        (
            f"soft tissue (L {SOFT_TISSUE_WINDOW[0]:g} / W {SOFT_TISSUE_WINDOW[1]:g})",
            SOFT_TISSUE_WINDOW,
            None,
        ),
        (f"zoom on lesion, lung window ({2 * ZOOM_HALF_PX} px)", LUNG_WINDOW, zoom),
    ]
    fig, axes = plt.subplots(3, len(columns), figsize=(3.3 * len(columns), 10.4), squeeze=False)
    difference_artist = None
    for i, (row_title, window, crop) in enumerate(row_defs):
        for j, (title, image, is_difference) in enumerate(columns):
            ax = axes[i, j]
            shown = image if crop is None else image[crop]
            if is_difference:
                difference_artist = ax.imshow(
                    shown,
                    cmap="RdBu_r",
                    vmin=-DIFFERENCE_RANGE_HU,
                    vmax=DIFFERENCE_RANGE_HU,
                    interpolation="nearest",
                )
            else:
                ax.imshow(
                    _window(shown, window), cmap="gray", vmin=0, vmax=1, interpolation="nearest"
                )
            if crop is None and i == 0:
                ax.add_patch(
                    Rectangle(
                        (c0, r0),
                        2 * ZOOM_HALF_PX,
                        2 * ZOOM_HALF_PX,
                        fill=False,
                        edgecolor="yellow",
                        linewidth=1,
                    )
                )
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=10)
            if j == 0:
                ax.set_ylabel(row_title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.92, 0.96))
    if difference_artist is not None:
        bar = fig.colorbar(difference_artist, cax=fig.add_axes((0.93, 0.3, 0.012, 0.4)))
        bar.set_label("output - true (HU)")
    fig.suptitle(
        f"{montage['subject']}, z = {montage['z_mm']:g} mm, zoom: {montage['what']} "
        f"(pixel {montage['pixel_spacing_mm'][0]:.3f} mm)"
    )
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def figure_nps(result: EvaluationResult, path: Path) -> Path | None:
    """Radial NPS curves per subject and pooled: every row and the true target."""
    panels = [(s, per) for s, per in result.nps.items() if per]
    if not panels:
        return None
    order = [*result.row_names, result.reference_name]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, (subject, per_row) in zip(axes.ravel(), panels, strict=True):
        for k, row in enumerate(order):
            if row not in per_row:
                continue
            r = per_row[row].result()
            style = (
                {"color": "black", "linewidth": 2.0}
                if row == result.reference_name
                else {"color": colours(k)}
            )
            ax.plot(
                r.frequency_lp_per_mm, r.nps, label=f"{row} (peak {r.peak_lp_per_mm:.2f})", **style
            )
        ax.set_xlabel("spatial frequency (lp/mm)")
        ax.set_ylabel("NPS (HU² mm²)")
        ax.set_title("all subjects (pooled)" if subject == "all" else subject)
        ax.set_xlim(0, None)
        ax.set_ylim(0, None)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Noise power spectrum in the uniform region (heart blood pool)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(result: EvaluationResult, out_dir: Path) -> list[Path]:
    """Write report.md, report.json and (if configured) figures/*.png; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figures: list[Path] = []
    if result.config.figures:
        figure_dir = out_dir / "figures"
        figure_dir.mkdir(exist_ok=True)
        figures.append(figure_ccc_bars(result, figure_dir / "ccc_by_class.png"))
        for maker, name in ((figure_montage, "montage.png"), (figure_nps, "nps.png")):
            made = maker(result, figure_dir / name)
            if made is not None:
                figures.append(made)
    json_path = out_dir / "report.json"
    json_path.write_text(json.dumps(report_json(result), indent=1) + "\n", encoding="utf-8")
    md_path = out_dir / "report.md"
    md_path.write_text(report_markdown(result, figures), encoding="utf-8")
    return [md_path, json_path, *figures]
