"""The evaluation on small synthetic pairs where the answer is known.

Images are 64 x 64 chest-like slices with a textured lung and a noisy soft-tissue disc; the
"true target" is the sharp image, the source a Gaussian-blurred copy, written as tag-paired DICOM
series with a truth.npz beside them (as in the shared data set).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from engine.interface import EngineIdentity, FloatVolume, SeriesGeometry, deliver
from engine.synthetic import make_ct_series
from evaluation.ccc import ccc_per_feature, summarize_by_class
from evaluation.eval_report import write_report
from evaluation.evaluate import main, run_evaluation
from evaluation.image_metrics import (
    NpsAccumulator,
    detrend_patch,
    hu_errors,
    nps_of_patches,
    uniform_patches,
)
from evaluation.radiomics_features import (
    FEATURE_CLASSES,
    RadiomicsSettings,
    RoiTask,
    extract_features,
    feature_class,
    gradient_magnitude,
)
from evaluation.results import EvaluationConfig
from evaluation.rois import gaussian_smooth_2d, hu_range_rois

SIZE = 64
N_SLICES = 3
SPACING = (0.7, 0.7)
TEXTURE_CLASSES = ("glcm", "glrlm", "glszm", "gldm", "ngtdm")


def phantom(seed: int = 0) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int16]]:
    """(sharp noisy volume, ideal volume) [N_SLICES, SIZE, SIZE] in HU."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    c = (SIZE - 1) / 2
    r = np.hypot(y - c, x - c)
    ideal = np.full((SIZE, SIZE), -1000.0)
    ideal[r < 28] = 40.0
    lung = np.hypot(y - c, x - c - 9) < 12
    ideal[lung] = -850.0
    ideal[lung & (np.hypot(y - c + 3, x - c - 12) < 4)] = -450.0  # a ground-glass "nodule"
    ideal[np.hypot(y - c - 16, x - c + 4) < 5] = 500.0  # bone
    ideal[(r > 24) & (r < 28)] = -90.0  # fat
    volume = np.repeat(ideal[None], N_SLICES, axis=0)
    noise = rng.normal(0.0, 35.0, volume.shape)
    sharp = volume + noise + 150.0 * gaussian_smooth_2d(rng.normal(0, 1, volume.shape), 1.2)
    return sharp.astype(np.float32), volume.astype(np.int16)


def rois_and_tasks(
    reference: npt.NDArray[np.float32], candidate: npt.NDArray[np.float32]
) -> list[RoiTask]:
    rois = hu_range_rois(
        reference, "S1", [0.0, 1.0, 2.0], n_per_range=6, window_px=16, min_pixels=20, seed=1
    )
    tasks = []
    for roi in rois:
        images = [roi.crop(v[roi.slice_index], 1) for v in (reference, candidate)]
        grads = [
            roi.crop(gradient_magnitude(v[roi.slice_index], SPACING), 1)
            for v in (reference, candidate)
        ]
        tasks.append(
            RoiTask(
                np.stack(images).astype(np.float32), np.stack(grads), roi.padded_mask(1), SPACING
            )
        )
    return tasks


def class_means(names: list[str], values: npt.NDArray[np.float64]) -> dict[str, float]:
    ccc = ccc_per_feature(values[:, 0, :], values[:, 1, :])
    summary = summarize_by_class(ccc, [feature_class(n) for n in names], FEATURE_CLASSES)
    return {k: v.mean for k, v in summary.items()}


def test_identical_images_give_ccc_one_for_every_feature() -> None:
    sharp, _ = phantom()
    names, values = extract_features(rois_and_tasks(sharp, sharp.copy()), RadiomicsSettings())
    ccc = ccc_per_feature(values[:, 0, :], values[:, 1, :])
    defined = ccc[np.isfinite(ccc)]
    assert {feature_class(n) for n in names} == set(FEATURE_CLASSES)
    assert defined.size >= 0.9 * len(names), "most features must vary across ROIs"
    np.testing.assert_allclose(defined, 1.0, atol=1e-9, err_msg="identical images, CCC != 1")


def test_a_known_blur_lowers_texture_class_ccc() -> None:
    sharp, _ = phantom()
    blurred = gaussian_smooth_2d(sharp, 1.5)
    names, values = extract_features(rois_and_tasks(sharp, blurred), RadiomicsSettings())
    means = class_means(names, values)
    for cls in TEXTURE_CLASSES:
        assert means[cls] < 0.9, f"{cls}: mean CCC {means[cls]:.3f} after a 1.5 px blur"
    assert np.mean([means[c] for c in TEXTURE_CLASSES]) < 0.75


def test_nps_integral_equals_variance_and_white_noise_is_flat() -> None:
    rng = np.random.default_rng(5)
    image = rng.normal(0.0, 20.0, (128, 128))
    corners = uniform_patches(np.ones((128, 128), bool), 32)
    acc = nps_of_patches(image, corners, 32, (0.7, 0.7), detrend="mean")
    result = (acc + NpsAccumulator.empty()).result()
    assert result.integral_hu2 == pytest.approx(400.0, rel=0.05)
    band = result.nps[(result.frequency_lp_per_mm > 0.1) & (result.frequency_lp_per_mm < 0.6)]
    assert band.std() / band.mean() < 0.15  # white noise: flat NPS = variance * dx * dy
    assert band.mean() == pytest.approx(400.0 * 0.49, rel=0.1)


def test_quadratic_detrend_removes_a_ramp_and_errors_are_measured_in_the_mask() -> None:
    y, x = np.mgrid[0:16, 0:16].astype(np.float64)
    assert np.abs(detrend_patch(3.0 + 2.0 * x - y + 0.1 * x * y, "quadratic")).max() < 1e-9
    truth = np.zeros((2, 4, 4))
    candidate = truth + np.array([3.0, -4.0])[:, None, None]
    errors = hu_errors(candidate, truth, np.ones_like(truth, bool))
    assert (errors.mae_hu, errors.rmse_hu) == pytest.approx((3.5, np.sqrt(12.5)))


class _FakeEngine:
    """A deterministic engine for the test: scale the deviation from 40 HU (no DICOM involved)."""

    def __init__(self, name: str, gain: float) -> None:
        self._identity = EngineIdentity(
            name, "0.0.1", f"{abs(hash(name)):064x}"[:64], "Br40d", "Bl64d"
        )
        self.gain = gain

    @property
    def identity(self) -> EngineIdentity:
        return self._identity

    def standardize(
        self,
        volume_hu: FloatVolume,
        geometry: SeriesGeometry,
        *,
        seed: int = 0,
        noise_hu: float | None = None,
        out: FloatVolume | None = None,
    ) -> FloatVolume:
        del geometry, seed
        return deliver(((volume_hu - 40.0) * self.gain + 40.0).astype(np.float32), out)


def write_pair(root: Path) -> Path:
    """Br40d (blurred) and Bl64d (sharp) series of one study in root/S001, with truth.npz."""
    sharp, ideal = phantom(3)
    smooth = gaussian_smooth_2d(sharp, 1.5)
    subject = root / "S001"
    subject.mkdir(parents=True)
    source = make_ct_series(
        N_SLICES, kernel="Br40d", volume_hu=smooth, uid_seed="eval-src", pixel_spacing=SPACING
    )
    target = make_ct_series(
        N_SLICES, kernel="Bl64d", volume_hu=sharp, uid_seed="eval-tgt", pixel_spacing=SPACING
    )
    for ds in target:
        ds.StudyInstanceUID = source[0].StudyInstanceUID
        ds.FrameOfReferenceUID = source[0].FrameOfReferenceUID
    for ds in source + target:
        ds.save_as(subject / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
    nodules = np.zeros(ideal.shape, np.uint8)
    nodules[:2] = (ideal[:2] == -450).astype(np.uint8)  # the ground-glass blob, 2 slices
    uniform = np.zeros(ideal.shape, bool)
    uniform[:, 20:44, 14:30] = True
    z = np.asarray([float(ds.ImagePositionPatient[2]) for ds in source], np.float32)
    np.savez(
        subject / "truth.npz",
        labels=np.zeros(ideal.shape, np.uint8),
        nodule_ids=nodules,
        hu_ideal=ideal,
        uniform_roi=uniform,
        z=z,
    )
    sidecar = {
        "subject": "S001",
        "habitus": "normal",
        "dose_factor": 0.5,
        "patient_name": "PHANTOM^X",
    }
    (subject / "truth.json").write_text(json.dumps(sidecar))
    return root


def small_config(data: Path, out: Path) -> EvaluationConfig:
    return EvaluationConfig(
        data=(data,),
        out=out,
        rois_per_range=5,
        window_px=16,
        range_min_pixels=20,
        lesion_min_pixels=20,
        nps_patch_px=8,
        figures=False,
        progress=False,
    )


def test_masks_do_not_depend_on_the_candidate(tmp_path: Path) -> None:
    data = write_pair(tmp_path / "data")
    config = small_config(data, tmp_path / "out")
    one = run_evaluation(config, [_FakeEngine("engine-a", 1.0)])
    two = run_evaluation(config, [_FakeEngine("engine-b", 3.0), _FakeEngine("engine-c", 0.2)])
    assert [r.key() for r in one.rois] == [r.key() for r in two.rois]
    assert {r.group for r in one.rois} >= {"lesion", "HU [-100, 250]"}
    np.testing.assert_array_equal(one.features["True Bl64d"], two.features["True Bl64d"])
    assert one.row_names == ["Baseline (Br40d)", "engine-a"]
    assert two.row_names == ["Baseline (Br40d)", "engine-b", "engine-c"]
    # the engine ran through the node's DICOM path: different gains, different features
    assert not np.allclose(two.features["engine-b"], two.features["engine-c"], equal_nan=True)


def test_report_holds_every_row_group_and_setting(tmp_path: Path) -> None:
    data = write_pair(tmp_path / "data")
    result = run_evaluation(small_config(data, tmp_path / "out"), [_FakeEngine("engine-a", 1.0)])
    paths = write_report(result, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert [p.name for p in paths] == ["report.md", "report.json"]
    assert report["rows"] == ["Baseline (Br40d)", "engine-a"]
    assert report["settings"]["radiomics"]["bin_width_hu"] == 25.0
    assert report["engines"][0]["weights_sha256"] == result.engines[0]["weights_sha256"]
    assert "PatientName" not in json.dumps(report) and "LTDIFF" not in json.dumps(report)
    for group in result.groups:
        assert group in report["groups"]
        assert set(report["groups"][group]["summary"]["engine-a"]) == {*FEATURE_CLASSES, "all"}
    assert "| engine-a |" in markdown and "Lesion ROIs" in markdown
    assert report["image_metrics"]["S001"]["engine-a"]["noise_sd_hu"] > 0
    # the simulator's sidecar gives the description its habitus and dose, never the phantom name
    (facts,) = report["data"]["subjects"]
    assert facts["simulation"] == {"habitus": "normal", "dose_factor": 0.5}
    assert "habitus normal, dose factor 0.5" in facts["description"] in markdown
    assert "PHANTOM" not in json.dumps(report) and "PHANTOM" not in markdown
    # one subject: its per-subject CCC is the pooled one, or marked too few ROIs
    assert list(report["per_subject"]) == ["S001"] and "### S001" in markdown
    for group in result.groups:
        entry = report["per_subject"]["S001"][group]
        n = entry["n_rois"]["engine-a"]
        assert n == report["groups"][group]["n_rois"]["engine-a"]
        if n < result.config.subject_min_rois:
            assert entry["too_few_rois"] and entry["summary"]["engine-a"] is None
        else:
            assert entry["summary"]["engine-a"] == report["groups"][group]["summary"]["engine-a"]


def test_cli_runs_the_shipped_linear_engine_and_draws_figures(tmp_path: Path) -> None:
    data = write_pair(tmp_path / "data")
    out = tmp_path / "report"
    code = main(
        [
            "--data",
            str(data),
            "--out",
            str(out),
            "--rois-per-range",
            "4",
            "--window-px",
            "16",
            "--lesion-min-pixels",
            "20",
            "--workers",
            "2",
            "--quiet",
        ]
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["rows"] == ["Baseline (Br40d)", "linear-filter"]
    assert sorted(p.name for p in (out / "figures").iterdir()) == [
        "ccc_by_class.png",
        "montage.png",
        "nps.png",
    ]


def test_cli_reports_missing_pairs_with_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), "--quiet"]) == 1
    assert "no same-acquisition" in capsys.readouterr().err


def test_cli_hands_sampler_options_to_ltdiff_engines_and_reports_them(tmp_path: Path) -> None:
    from ltdiff_support import tiny_weights

    from engine.ltdiff.weights import save_weights

    data = write_pair(tmp_path / "data")
    weights = tmp_path / "tiny.safetensors"
    save_weights(weights, tiny_weights())
    out = tmp_path / "report"
    args = ["--data", str(data), "--out", str(out), "--rois-per-range", "4", "--window-px", "16"]
    args += ["--lesion-min-pixels", "20", "--quiet", "--no-figures"]
    args += ["--engine", f"ltdiff:{weights}", "--sample-steps", "2", "--precision", "float32"]
    assert main(args) == 0
    (entry,) = json.loads((out / "report.json").read_text())["engines"]
    assert entry["settings"].startswith("ddim2 ")
    assert entry["denoiser_dtype"] == "float32"
    assert "ddim2" in (out / "report.md").read_text()
