"""`ltdiff-node evaluate`: does a standardized series agree with a real target-kernel series?

One loop over the paired subjects found under `--data` (pairing by tags, `training.pairs`):

1. read the source (Br40) and true target (Bl64) slices, and the repeat target scan if the
   subject has a second, independent acquisition;
2. run every engine on the source DICOM files through `engine.pipeline.standardize_series` (the
   node's own code path, storage and clipping included) and decode the derived datasets to HU;
3. build the ROIs from the reference only (`evaluation.rois`: truth masks, else the true target
   image): lesion ROIs and random ROIs in the paper's four HU ranges;
4. image metrics per row: HU MAE / RMSE in the body, noise SD and NPS in the uniform region.

Then PyRadiomics features of every ROI in every image (`evaluation.radiomics_features`, a process
pool), Lin's CCC per feature against the true target across ROIs, summaries per class
(`evaluation.ccc`), and the report (`evaluation.eval_report`: Markdown, JSON, PNG figures). The CCC
is computed twice: pooled over the ROIs of all subjects, and per subject over that subject's ROIs
only (a pooled table hides a subject that fails); a subject and ROI group with fewer than
`subject_min_rois` ROIs gets no per-subject CCC and is reported as such.

Rows: "Baseline (<source kernel>)" (the source as it is), one per engine, and "Repeat scan
(ceiling)" on the subjects that have a repeat acquisition.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from engine.interface import Engine
from engine.pipeline import standardize_series
from engine.pixels import dataset_to_hu
from engine.registry import (
    KNOWN_ENGINE_KINDS,
    LTDIFF_KIND,
    MAX_SAMPLE_STEPS,
    PRECISIONS,
    EngineOptions,
    load_engine,
)
from evaluation.ccc import ccc_per_feature
from evaluation.eval_report import write_report
from evaluation.image_metrics import (
    NpsAccumulator,
    hu_errors,
    noise_sd_per_slice,
    nps_of_patches,
    uniform_patches,
)
from evaluation.labels import REPEAT_ROW
from evaluation.radiomics_features import (
    RadiomicsSettings,
    RoiTask,
    default_workers,
    extract_features,
    gradient_magnitude,
)
from evaluation.results import (
    SUBJECT_MIN_ROIS,
    EvaluationConfig,
    EvaluationResult,
    roi_selection,
)
from evaluation.rois import (
    LESION_GROUP,
    Roi,
    body_mask,
    hu_range_rois,
    lesion_rois,
    mask_reference,
)
from training.pairs import (
    DEFAULT_SOURCE_KERNEL,
    DEFAULT_TARGET_KERNEL,
    POSITION_TOLERANCE_MM,
    PairedSeries,
    find_paired_series,
    read_hu,
)

FloatVolume = npt.NDArray[np.float32]

DEFAULT_ENGINE = "linear-filter"
TRUTH_FACTS = ("habitus", "dose_factor")
"""The only keys of a subject's truth.json (the simulator's sidecar) that the report repeats;
the file also names the phantom, which stays out of reports."""
_MARGIN_PX = 1
"""Background pixels around every ROI box handed to PyRadiomics, which refuses a mask that is
all foreground (a window lying wholly inside one HU range). Features use masked pixels only."""


@dataclass(frozen=True)
class EngineSpec:
    """`KIND[:WEIGHTS]` from the command line."""

    kind: str
    weights: Path | None = None

    @staticmethod
    def parse(text: str) -> EngineSpec:
        kind, _, weights = text.partition(":")
        if kind not in KNOWN_ENGINE_KINDS:
            raise argparse.ArgumentTypeError(
                f"--engine {text!r}: unknown kind {kind!r}; known: {', '.join(KNOWN_ENGINE_KINDS)}"
            )
        return EngineSpec(kind, Path(weights) if weights else None)


@dataclass
class _SubjectImages:
    """One paired subject in memory: volumes [slices, rows, cols] in HU, pair order (z up)."""

    label: str
    pair: PairedSeries
    rows: dict[str, FloatVolume]
    """Candidate rows: baseline, engines, and the repeat scan if any."""
    target: FloatVolume
    nodule_ids: npt.NDArray[np.uint8] | None
    hu_ideal: npt.NDArray[np.int16] | None
    uniform: npt.NDArray[np.bool_] | None
    notes: list[str]


def ccc_by_group(
    rois: Sequence[Roi],
    features: dict[str, npt.NDArray[np.float64]],
    reference_name: str,
    rows: Sequence[str],
    groups: Sequence[str],
    *,
    subject: str | None = None,
    min_rois: int = 2,
) -> dict[str, dict[str, npt.NDArray[np.float64]]]:
    """ccc[group][row] = CCC per feature of `row` against the reference across the ROIs of the
    group (of `subject` only, or of every subject for None) where the row has features.

    features: per row and for the reference, [n_rois, n_features] aligned with `rois`. A group
    and row with fewer than `min_rois` such ROIs gets all NaN (no CCC)."""
    reference = features[reference_name]
    out: dict[str, dict[str, npt.NDArray[np.float64]]] = {}
    for group in groups:
        out[group] = {}
        for row in rows:
            have = roi_selection(rois, features[row], group, subject)
            if int(have.sum()) < min_rois:
                out[group][row] = np.full(reference.shape[1], np.nan)
            else:
                out[group][row] = ccc_per_feature(reference[have], features[row][have])
    return out


def _z_index(z_values: Sequence[float], z: float) -> int | None:
    best = int(np.argmin(np.abs(np.asarray(z_values, dtype=np.float64) - z)))
    return best if abs(float(z_values[best]) - z) <= POSITION_TOLERANCE_MM else None


def _dataset_z(ds: Any) -> float:
    orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
    normal = np.cross(orientation[:3], orientation[3:])
    return float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient]))


def _load_truth(
    pair: PairedSeries, z: Sequence[float], notes: list[str]
) -> tuple[
    npt.NDArray[np.uint8] | None, npt.NDArray[np.int16] | None, npt.NDArray[np.bool_] | None
]:
    path = pair.pairs[0].source_path.parent / "truth.npz"
    if not path.is_file():
        notes.append(f"{pair.subject_label}: no truth.npz; masks from the smoothed true target")
        return None, None, None
    with np.load(path) as truth:
        tz = [float(v) for v in truth["z"]]
        index = [_z_index(tz, zz) for zz in z]
        if any(i is None for i in index) or truth["hu_ideal"].shape[1:] != (
            pair.rows,
            pair.columns,
        ):
            notes.append(
                f"{pair.subject_label}: truth.npz does not cover the paired slices; unused"
            )
            return None, None, None
        order = np.asarray(index, dtype=np.intp)
        return (
            truth["nodule_ids"][order].astype(np.uint8),
            truth["hu_ideal"][order].astype(np.int16),
            truth["uniform_roi"][order].astype(bool),
        )


def _truth_facts(pair: PairedSeries, notes: list[str]) -> dict[str, Any]:
    """`TRUTH_FACTS` from the subject's truth.json (simulated data), else {}."""
    path = pair.pairs[0].source_path.parent / "truth.json"
    if not path.is_file():
        return {}
    try:
        truth = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        notes.append(f"{pair.subject_label}: truth.json unreadable ({type(error).__name__})")
        return {}
    if not isinstance(truth, dict):
        return {}
    return {k: truth[k] for k in TRUTH_FACTS if isinstance(truth.get(k), str | int | float)}


def subject_description(summary: dict[str, Any], noise_sd_hu: float | None) -> str:
    """One line about a subject from its data summary (and the source's measured noise SD)."""
    rows, columns = summary["matrix"]
    spacing = summary["pixel_spacing_mm"][1]
    parts = [
        f"{rows}x{columns} at {spacing:.3f} mm (field of view {columns * spacing:.0f} mm), "
        f"{summary['slices']} slices"
    ]
    facts = summary.get("simulation") or {}
    if facts:
        parts.append(
            "simulated "
            + ", ".join(
                f"dose factor {v:g}"
                if k == "dose_factor" and isinstance(v, int | float)
                else f"{k} {v}"
                for k, v in facts.items()
            )
        )
    if noise_sd_hu is not None and np.isfinite(noise_sd_hu):
        parts.append(f"{summary['source_kernel']} noise SD {noise_sd_hu:.1f} HU")
    parts.append("repeat scan" if summary["repeat_scan"] else "no repeat scan")
    return "; ".join(parts)


def _run_engine(pair: PairedSeries, eng: Engine, z: Sequence[float]) -> FloatVolume:
    """The engine's output through the node's code path, decoded from the derived datasets."""
    result = standardize_series([p.source_path for p in pair.pairs], eng)
    volume = np.empty((len(z), pair.rows, pair.columns), dtype=np.float32)
    filled = np.zeros(len(z), dtype=bool)
    for ds in result.datasets:
        index = _z_index(z, _dataset_z(ds))
        if index is None:
            raise RuntimeError(f"{pair.subject_label}: derived slice at an unpaired position")
        volume[index] = dataset_to_hu(ds)
        filled[index] = True
    if not filled.all():
        raise RuntimeError(
            f"{pair.subject_label}: the engine output lacks {int((~filled).sum())} slices"
        )
    return volume


def _load_subject(
    pair: PairedSeries,
    repeat: PairedSeries | None,
    engines: Sequence[tuple[str, Engine]],
    baseline_row: str,
) -> _SubjectImages:
    z = [p.z_mm for p in pair.pairs]
    notes: list[str] = []
    source = np.stack([read_hu(p.source_path) for p in pair.pairs])
    target = np.stack([read_hu(p.target_path) for p in pair.pairs])
    rows: dict[str, FloatVolume] = {baseline_row: source}
    for name, eng in engines:
        rows[name] = _run_engine(pair, eng, z)
    if repeat is not None:
        by_z = {round(p.z_mm, 2): p.target_path for p in repeat.pairs}
        paths = [by_z.get(round(zz, 2)) for zz in z]
        if all(p is not None for p in paths):
            rows[REPEAT_ROW] = np.stack([read_hu(p) for p in paths if p is not None])
        else:
            notes.append(f"{pair.subject_label}: repeat scan lacks some paired slices; not used")
    nodule_ids, hu_ideal, uniform = _load_truth(pair, z, notes)
    return _SubjectImages(
        pair.subject_label, pair, rows, target, nodule_ids, hu_ideal, uniform, notes
    )


def _subject_rois(subject: _SubjectImages, config: EvaluationConfig) -> list[Roi]:
    """ROIs of one subject from the reference only (truth, else the true target)."""
    z = [p.z_mm for p in subject.pair.pairs]
    rois: list[Roi] = []
    if subject.nodule_ids is not None:
        rois += lesion_rois(
            subject.nodule_ids, subject.label, z, min_pixels=config.lesion_min_pixels
        )
    reference = mask_reference(subject.target, subject.hu_ideal)
    rois += hu_range_rois(
        reference,
        subject.label,
        z,
        n_per_range=config.rois_per_range,
        window_px=config.window_px,
        min_pixels=config.range_min_pixels,
        seed=config.seed,
    )
    return rois


def _image_metrics(
    subject: _SubjectImages, config: EvaluationConfig, reference_name: str
) -> tuple[dict[str, Any], dict[str, NpsAccumulator]]:
    reference = mask_reference(subject.target, subject.hu_ideal)
    body = np.stack([body_mask(s) for s in reference])
    metrics: dict[str, Any] = {}
    nps: dict[str, NpsAccumulator] = {}
    spacing = subject.pair.pixel_spacing_mm
    corners = (
        [uniform_patches(m, config.nps_patch_px) for m in subject.uniform]
        if subject.uniform is not None
        else None
    )
    for name, volume in [*subject.rows.items(), (reference_name, subject.target)]:
        entry: dict[str, Any] = {}
        if name != reference_name:
            errors = hu_errors(volume, subject.target, body)
            entry.update(mae_hu=errors.mae_hu, rmse_hu=errors.rmse_hu, n_pixels=errors.n_pixels)
        if subject.uniform is not None and corners is not None:
            sds = noise_sd_per_slice(volume, subject.uniform)
            entry["noise_sd_hu"] = float(np.median(sds)) if sds else float("nan")
            acc = NpsAccumulator.empty()
            for image, c in zip(volume, corners, strict=True):
                acc = acc + nps_of_patches(image, c, config.nps_patch_px, spacing)
            nps[name] = acc
            result = acc.result()
            entry.update(
                nps_peak_lp_per_mm=result.peak_lp_per_mm,
                nps_integral_hu2=result.integral_hu2,
                nps_patches=result.n_patches,
            )
        metrics[name] = entry
    return metrics, nps


def _roi_tasks(
    subject: _SubjectImages, rois: Sequence[Roi], order: Sequence[str]
) -> list[tuple[list[str], RoiTask]]:
    """One task per ROI: the reference first, then every row this subject has, in `order`."""
    spacing = subject.pair.pixel_spacing_mm
    names = [n for n in order if n in subject.rows]
    volumes = [subject.target, *(subject.rows[n] for n in names)]
    gradients: dict[tuple[int, int], npt.NDArray[np.float32]] = {}
    tasks = []
    for roi in rois:
        images, grads = [], []
        for k, volume in enumerate(volumes):
            key = (k, roi.slice_index)
            if key not in gradients:
                gradients[key] = gradient_magnitude(volume[roi.slice_index], spacing)
            images.append(roi.crop(volume[roi.slice_index], _MARGIN_PX).astype(np.float32))
            grads.append(roi.crop(gradients[key], _MARGIN_PX))
        mask = roi.padded_mask(_MARGIN_PX)
        tasks.append((names, RoiTask(np.stack(images), np.stack(grads), mask, spacing)))
    return tasks


def _montage(
    subject: _SubjectImages,
    rois: Sequence[Roi],
    baseline_row: str,
    engine_rows: Sequence[str],
    reference_name: str,
) -> dict[str, Any]:
    lesions = [r for r in rois if r.group == LESION_GROUP]
    if lesions:
        roi = max(lesions, key=lambda r: r.n_pixels)
        index = roi.slice_index
        h, w = roi.mask.shape
        centre = (roi.row0 + h // 2, roi.col0 + w // 2)
        what = f"{roi.origin}, {roi.n_pixels} px"
    else:
        index = len(subject.pair.pairs) // 2
        centre = (subject.pair.rows // 2, subject.pair.columns // 2)
        what = "image centre (no lesion truth)"
    images = {baseline_row: subject.rows[baseline_row][index]}
    images.update({n: subject.rows[n][index] for n in engine_rows})
    images[reference_name] = subject.target[index]
    return {
        "subject": subject.label,
        "z_mm": subject.pair.pairs[index].z_mm,
        "centre": centre,
        "what": what,
        "images": {k: v.copy() for k, v in images.items()},
        "baseline": baseline_row,
        "engines": list(engine_rows),
        "reference": reference_name,
        "pixel_spacing_mm": subject.pair.pixel_spacing_mm,
    }


def run_evaluation(
    config: EvaluationConfig, engines: Sequence[Engine], engine_files: Sequence[Path | None] = ()
) -> EvaluationResult:
    """Evaluate `engines` (already loaded) on the paired data of `config`; see the module doc.

    engine_files: the weights file of each engine, for the report (None: shipped / unknown).
    """
    started = time.perf_counter()
    timings: dict[str, float] = {}
    found = find_paired_series(
        list(config.data), source_kernel=config.source_kernel, target_kernel=config.target_kernel
    )
    primary = [p for p in found.paired if p.same_acquisition]
    if config.subjects:
        primary = [p for p in primary if p.subject_label in config.subjects]
    if not primary:
        raise RuntimeError(
            f"no same-acquisition {config.source_kernel} / {config.target_kernel} pairs found "
            f"under {', '.join(map(str, config.data))}"
            + (f" for subjects {', '.join(config.subjects)}" if config.subjects else "")
        )
    source_kernel = primary[0].source_kernel
    target_kernel = primary[0].target_kernel
    baseline_row = f"Baseline ({source_kernel})"
    reference_name = f"True {target_kernel}"

    engine_rows: list[tuple[str, Engine]] = []
    engine_info: list[dict[str, str]] = []
    files = list(engine_files) + [None] * (len(engines) - len(engine_files))
    names = [e.identity.name for e in engines]
    for eng, weights in zip(engines, files, strict=True):
        ident = eng.identity
        name = (
            ident.name
            if names.count(ident.name) == 1
            else f"{ident.name} w:{ident.weights_sha256[:8]}"
        )
        engine_rows.append((name, eng))
        engine_info.append(
            {
                "row": name,
                "name": ident.name,
                "version": ident.version,
                "weights_sha256": ident.weights_sha256,
                "weights_file": weights.name if weights is not None else "shipped",
                "source_kernel": ident.source_kernel,
                "target_kernel": ident.target_kernel,
                "settings": ident.settings,
                # the learned engines' denoiser dtype (bf16 where the hardware has it)
                "denoiser_dtype": str(getattr(eng, "denoiser_dtype", None) or "").removeprefix(
                    "torch."
                ),
            }
        )
    row_order = [baseline_row, *(n for n, _ in engine_rows), REPEAT_ROW]

    notes = list(found.issues)
    rois: list[Roi] = []
    tasks: list[tuple[list[str], RoiTask]] = []
    image_metrics: dict[str, Any] = {}
    nps: dict[str, dict[str, NpsAccumulator]] = {}
    subjects_summary: list[dict[str, Any]] = []
    montage: dict[str, Any] | None = None
    errors_pooled: dict[str, list[tuple[float, float, int]]] = {}
    subject_row_names: dict[str, list[str]] = {}
    bar = tqdm(
        primary, desc="subjects (read, engines, ROIs)", unit="subject", disable=not config.progress
    )
    for pair in bar:
        repeats = [
            p
            for p in found.paired
            if not p.same_acquisition
            and p.source_series_uid == pair.source_series_uid
            and p.subject_label == pair.subject_label
        ]
        subject = _load_subject(pair, repeats[0] if repeats else None, engine_rows, baseline_row)
        notes += subject.notes
        subject_rois = _subject_rois(subject, config)
        rois += subject_rois
        tasks += _roi_tasks(subject, subject_rois, row_order)
        metrics, subject_nps = _image_metrics(subject, config, reference_name)
        image_metrics[subject.label] = metrics
        nps[subject.label] = subject_nps
        for row, entry in metrics.items():
            if "mae_hu" in entry:
                errors_pooled.setdefault(row, []).append(
                    (entry["mae_hu"], entry["rmse_hu"], entry["n_pixels"])
                )
        if montage is None or (
            montage["what"].startswith("image") and subject.nodule_ids is not None
        ):
            montage = _montage(
                subject, subject_rois, baseline_row, [n for n, _ in engine_rows], reference_name
            )
        subject_facts: dict[str, Any] = {
            "subject": subject.label,
            "slices": subject.pair.n_slices,
            "matrix": [subject.pair.rows, subject.pair.columns],
            "pixel_spacing_mm": list(subject.pair.pixel_spacing_mm),
            "field_of_view_mm": subject.pair.columns * subject.pair.pixel_spacing_mm[1],
            "z_range_mm": [subject.pair.pairs[0].z_mm, subject.pair.pairs[-1].z_mm],
            "source_kernel": subject.pair.source_kernel,
            "target_kernel": subject.pair.target_kernel,
            "repeat_scan": REPEAT_ROW in subject.rows,
            "ground_truth": subject.nodule_ids is not None,
            "simulation": _truth_facts(pair, notes),
            "rois": {
                g: sum(1 for r in subject_rois if r.group == g)
                for g in {r.group for r in subject_rois}
            },
        }
        subject_facts["description"] = subject_description(
            subject_facts, metrics.get(baseline_row, {}).get("noise_sd_hu")
        )
        subjects_summary.append(subject_facts)
        subject_row_names[subject.label] = [r for r in row_order if r in subject.rows]
    timings["read_engines_rois_s"] = time.perf_counter() - started

    pooled: dict[str, Any] = {}
    for row, values in errors_pooled.items():
        n = sum(v[2] for v in values)
        pooled[row] = {
            "mae_hu": sum(v[0] * v[2] for v in values) / n,
            "rmse_hu": float(np.sqrt(sum(v[1] ** 2 * v[2] for v in values) / n)),
            "n_pixels": n,
        }
    all_nps: dict[str, NpsAccumulator] = {}
    for per_subject in nps.values():
        for row, acc in per_subject.items():
            all_nps[row] = all_nps.get(row, NpsAccumulator.empty()) + acc
    for row, acc in all_nps.items():
        result = acc.result()
        pooled.setdefault(row, {}).update(
            nps_peak_lp_per_mm=result.peak_lp_per_mm,
            nps_integral_hu2=result.integral_hu2,
            nps_patches=result.n_patches,
        )
        sds = [
            m[row]["noise_sd_hu"] for m in image_metrics.values() if "noise_sd_hu" in m.get(row, {})
        ]
        pooled[row]["noise_sd_hu_mean_of_subjects"] = float(np.mean(sds)) if sds else float("nan")
    image_metrics["all"] = pooled
    nps["all"] = all_nps

    extract_started = time.perf_counter()
    with tqdm(
        total=len(tasks), desc="PyRadiomics (ROIs)", unit="roi", disable=not config.progress
    ) as progress:
        feature_names, per_task = extract_features(
            [t for _, t in tasks], config.radiomics, workers=config.workers, progress=progress
        )
    timings["radiomics_s"] = time.perf_counter() - extract_started

    rows_present = [r for r in row_order if any(r in names_ for names_, _ in tasks)]
    n_features = len(feature_names)
    features = {
        r: np.full((len(rois), n_features), np.nan) for r in [reference_name, *rows_present]
    }
    for i, ((task_rows, _), values) in enumerate(zip(tasks, per_task, strict=True)):
        features[reference_name][i] = values[0]
        for k, row in enumerate(task_rows, start=1):
            features[row][i] = values[k]

    groups = list(dict.fromkeys(r.group for r in rois))
    ccc = ccc_by_group(rois, features, reference_name, rows_present, groups)
    subject_ccc = {
        label: ccc_by_group(
            rois,
            features,
            reference_name,
            [r for r in rows_present if r in subject_rows],
            groups,
            subject=label,
            min_rois=config.subject_min_rois,
        )
        for label, subject_rows in subject_row_names.items()
    }

    timings["total_s"] = time.perf_counter() - started
    return EvaluationResult(
        config=config,
        row_names=rows_present,
        reference_name=reference_name,
        engines=engine_info,
        rois=rois,
        feature_names=feature_names,
        features=features,
        ccc=ccc,
        subject_ccc=subject_ccc,
        image_metrics=image_metrics,
        nps=nps,
        data_summary={
            "subjects": subjects_summary,
            "n_subjects": len(subjects_summary),
            "n_slices": sum(s["slices"] for s in subjects_summary),
            "source_kernel": source_kernel,
            "target_kernel": target_kernel,
            "unpaired_files": len(found.unpaired),
        },
        montage=montage,
        timings_s=timings,
        notes=notes,
    )


def _min_rois(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: a CCC needs an integer of at least 2 ROIs")
    return value


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ltdiff-node evaluate",
        description="Radiomic feature agreement (Lin's CCC) and image metrics of engines' "
        "outputs against true target-kernel series, on tag-paired data.",
    )
    parser.add_argument(
        "--data",
        type=Path,
        action="append",
        required=True,
        metavar="DIR",
        help="folder tree with paired series (repeatable, e.g. train/ and repeat/)",
    )
    parser.add_argument(
        "--engine",
        type=EngineSpec.parse,
        action="append",
        metavar="KIND[:WEIGHTS]",
        help=f"engine to evaluate (repeatable; default {DEFAULT_ENGINE} with its shipped weights)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="report folder: report.md, report.json, figures/",
    )
    parser.add_argument("--subjects", help="comma-separated subject labels (folder names) to use")
    parser.add_argument("--source-kernel", default=DEFAULT_SOURCE_KERNEL, metavar="REGEX")
    parser.add_argument("--target-kernel", default=DEFAULT_TARGET_KERNEL, metavar="REGEX")
    parser.add_argument("--seed", type=int, default=0, help="ROI placement seed")
    parser.add_argument("--rois-per-range", type=int, default=EvaluationConfig.rois_per_range)
    parser.add_argument("--window-px", type=int, default=EvaluationConfig.window_px)
    parser.add_argument("--lesion-min-pixels", type=int, default=EvaluationConfig.lesion_min_pixels)
    parser.add_argument(
        "--subject-min-rois",
        type=_min_rois,
        default=SUBJECT_MIN_ROIS,
        metavar="N",
        help="fewest ROIs of one subject and group for a per-subject CCC, at least 2 "
        f"(default {SUBJECT_MIN_ROIS})",
    )
    parser.add_argument(
        "--bin-width",
        type=float,
        default=RadiomicsSettings.bin_width_hu,
        help="PyRadiomics bin width in HU",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="PyRadiomics worker processes (default: the usable cores)",
    )
    parser.add_argument("--device", default="cpu", help="device for engines that use one")
    parser.add_argument(
        "--sample-steps",
        type=int,
        choices=range(1, MAX_SAMPLE_STEPS + 1),
        metavar="N",
        help="ltdiff engines: DDIM steps, 1..10 (default: the weights' setting)",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="learned engines: auto (bf16 where the hardware computes it natively, float32 "
        "sums and shortcuts), denoiser-bf16 (float32 encoder and decoder), bf16, float32",
    )
    parser.add_argument("--no-figures", action="store_true", help="skip the PNG figures")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    specs: list[EngineSpec] = args.engine or [EngineSpec(DEFAULT_ENGINE)]
    config = EvaluationConfig(
        data=tuple(args.data),
        out=args.out,
        subjects=tuple(s.strip() for s in args.subjects.split(",")) if args.subjects else None,
        source_kernel=args.source_kernel,
        target_kernel=args.target_kernel,
        seed=args.seed,
        lesion_min_pixels=args.lesion_min_pixels,
        subject_min_rois=args.subject_min_rois,
        rois_per_range=args.rois_per_range,
        window_px=args.window_px,
        radiomics=RadiomicsSettings(bin_width_hu=args.bin_width),
        workers=args.workers if args.workers is not None else default_workers(),
        figures=not args.no_figures,
        progress=not args.quiet,
    )
    engines = [
        load_engine(
            s.kind,
            s.weights,
            args.device,
            EngineOptions(precision=args.precision, sample_steps=args.sample_steps)
            if s.kind == LTDIFF_KIND
            else None,
        )
        for s in specs
    ]
    try:
        result = run_evaluation(config, engines, [s.weights for s in specs])
    except RuntimeError as error:
        print(f"ltdiff-node evaluate: {error}", file=sys.stderr)
        return 1
    paths = write_report(result, config.out)
    print(
        json.dumps(
            {"report": [str(p) for p in paths], "runtime_s": round(result.timings_s["total_s"], 1)}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
