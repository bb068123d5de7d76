"""Fitting the linear filter: known transfer functions are recovered; the CLI fits and reports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from engine.linear_filter import LinearFilterEngine, load_linear_filter
from training.fit_linear import FitConfig, fit_from_arrays, main

SPACING = (0.7, 0.7)


def gaussian_mtf(shape: tuple[int, int], f50: float) -> np.ndarray:
    """exp(-(f/fc)^2) on the rfft2 grid, with fc set so that the MTF is 0.5 at f50 lp/mm."""
    fy = np.fft.fftfreq(shape[0], d=SPACING[0])[:, None]
    fx = np.fft.rfftfreq(shape[1], d=SPACING[1])[None, :]
    fc = f50 / np.sqrt(np.log(2))
    return np.exp(-((np.hypot(fy, fx) / fc) ** 2))


def blurred_pair(
    rng: np.random.Generator, shape: tuple[int, int], f50_source: float, f50_target: float
) -> tuple[np.ndarray, np.ndarray]:
    """One object seen by two systems: same noise-like content, two MTFs."""
    spectrum = np.fft.rfft2(300.0 * rng.standard_normal(shape))
    source = np.fft.irfft2(spectrum * gaussian_mtf(shape, f50_source), s=shape)
    target = np.fft.irfft2(spectrum * gaussian_mtf(shape, f50_target), s=shape)
    return source, target


def expected_ratio(f: np.ndarray, f50_source: float, f50_target: float) -> np.ndarray:
    ln2 = np.log(2)
    return np.exp(-ln2 * (f / f50_target) ** 2 + ln2 * (f / f50_source) ** 2)


def test_filter_of_known_blur_is_recovered() -> None:
    rng = np.random.default_rng(0)
    pairs = [blurred_pair(rng, (128, 128), 0.35, 0.6) for _ in range(8)]
    fitted = fit_from_arrays(pairs, SPACING, FitConfig(n_bins=40, region="full"))
    lf = fitted.linear_filter
    probe = np.array([0.05, 0.15, 0.25, 0.35, 0.45])
    np.testing.assert_allclose(
        lf.gain_at(probe), expected_ratio(probe, 0.35, 0.6), rtol=0.04,
        err_msg="fitted gain should equal the ratio of the two MTFs where the source has signal",
    )  # fmt: skip
    coherence = np.interp(probe, lf.frequency_lp_per_mm, lf.coherence)
    assert np.all(coherence > 0.97), coherence
    assert lf.gain[0] == 1.0


def test_gain_is_bounded_where_source_carries_only_rounding_noise() -> None:
    """Above the source cutoff the Wiener gain must fall, not amplify noise without bound."""
    rng = np.random.default_rng(1)
    pairs = []
    for _ in range(4):
        source, target = blurred_pair(rng, (128, 128), 0.2, 0.6)
        pairs.append((np.rint(source), target))  # the source is stored as integers
    lf = fit_from_arrays(pairs, SPACING, FitConfig(n_bins=40, region="full")).linear_filter
    high = lf.frequency_lp_per_mm > 0.8
    # The true MTF ratio there exceeds 1e6; the fitted gain stays modest and coherence is ~0.
    assert np.all(lf.gain[high] < 50.0), lf.gain[high]
    assert np.all(lf.coherence[high] < 0.2), lf.coherence[high]


def write_image(folder: Path, hu: np.ndarray, *, series: str, kernel: str, z: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.StudyInstanceUID = f"1.2.3.{int(folder.name[1:])}"
    ds.FrameOfReferenceUID = f"1.2.3.{int(folder.name[1:])}.1"
    ds.SeriesInstanceUID = series
    ds.ConvolutionKernel = kernel
    ds.ImagePositionPatient = [0.0, 0.0, z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = list(SPACING)
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = np.clip(np.rint(hu) + 1024, 0, 4095).astype(np.uint16).tobytes()
    ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)


def test_cli_fits_writes_weights_and_reports_held_out_subject(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(2)
    for subject in ("S001", "S002", "S004"):
        source_uid, target_uid = generate_uid(), generate_uid()
        for z in (0.0, 1.0, 2.0):
            source, target = blurred_pair(rng, (64, 64), 0.35, 0.6)
            write_image(tmp_path / subject, source / 10, series=source_uid, kernel="Br40d", z=z)
            write_image(tmp_path / subject, target / 10, series=target_uid, kernel="Bl64d", z=z)
    out = tmp_path / "linear.safetensors"

    code = main(["--data", str(tmp_path), "--out", str(out), "--holdout", "S004", "--bins", "24"])

    assert code == 0
    printed = capsys.readouterr().out
    assert "S001, S002: 6 slices" in printed
    assert "held out S004 (3 slices)" in printed
    assert "central 32x32" in printed  # no truth.npz: the central square is used
    lf = load_linear_filter(out)
    assert lf.training_data["subjects"] == ["S001", "S002"]
    assert (lf.source_kernel, lf.target_kernel) == ("Br40d", "Bl64d")
    assert LinearFilterEngine.from_file(out).identity.name == "linear-filter"


def test_cli_fails_cleanly_without_training_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["--data", str(tmp_path), "--out", str(tmp_path / "w.safetensors")])
    assert code == 1
    assert "no paired series" in capsys.readouterr().err
