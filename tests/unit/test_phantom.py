"""The routing-test phantom: valid, deterministic CT with Br40-like noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from dicom_node.phantom import generate_phantom_series, main, render_phantom
from engine import __version__
from engine.synthetic import make_ct_dataset
from training.pairs import find_paired_series


def test_phantom_is_deterministic_and_valid_ct(tmp_path: Path) -> None:
    first = generate_phantom_series(tmp_path / "a", n_slices=3, size=64, seed=7)
    again = generate_phantom_series(tmp_path / "b", n_slices=3, size=64, seed=7)
    other = generate_phantom_series(tmp_path / "c", n_slices=3, size=64, seed=8)

    datasets = [dcmread(p) for p in first]
    for ds, path_again in zip(datasets, again, strict=True):
        ds_again = dcmread(path_again)
        assert ds.SOPInstanceUID == ds_again.SOPInstanceUID
        assert ds.PixelData == ds_again.PixelData
    assert dcmread(other[0]).StudyInstanceUID != datasets[0].StudyInstanceUID

    ds = datasets[0]
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == CTImageStorage
    assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
    assert ds.Modality == "CT"
    assert str(ds.PatientName) == "PHANTOM^LTDIFF"
    assert ds.PatientID == "LTDIFF-PHANTOM"
    assert ds.ConvolutionKernel == "Br40d"
    assert ds.SeriesDescription == "Phantom 1.0 Br40d"
    assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
    assert (float(ds.RescaleIntercept), float(ds.RescaleSlope)) == (-1024.0, 1.0)
    assert ds.StudyInstanceUID.startswith("2.25.")
    assert ds.pixel_array.shape == (64, 64)
    assert int(ds.pixel_array.max()) <= 4095
    assert len({d.SeriesInstanceUID for d in datasets}) == 1
    # InstanceNumber 1 is the most superior slice; SliceLocation matches the position.
    zs = [float(d.ImagePositionPatient[2]) for d in datasets]
    assert [int(d.InstanceNumber) for d in datasets] == [1, 2, 3]
    assert zs == sorted(zs, reverse=True)
    assert all(float(d.SliceLocation) == z for d, z in zip(datasets, zs, strict=True))


def test_phantom_noise_sd_in_expected_range() -> None:
    noisy = render_phantom(n_slices=2, size=512, seed=1)
    clean = render_phantom(n_slices=2, size=512, seed=1, noise_sd_hu=0.0)
    roi = noisy.uniform_roi
    assert roi.sum() > 2000
    sd = float(np.std(noisy.hu[roi]))
    assert 10.0 <= sd <= 12.0, f"soft-tissue noise SD {sd:.1f} HU, expected 10-12 HU"
    assert float(noisy.hu[roi].mean()) == pytest.approx(40.0, abs=1.0)

    # Br40-like texture: the radial NPS of the noise peaks near 0.27 lp/mm.
    noise = noisy.hu - clean.hu
    power = np.abs(np.fft.rfft2(noise)) ** 2
    fy = np.fft.fftfreq(512, d=0.703125)[:, None]
    fx = np.fft.rfftfreq(512, d=0.703125)[None, :]
    ring = np.rint(np.hypot(fy, fx) / 0.02).astype(int).ravel()
    nps = np.bincount(ring, power.sum(axis=0).ravel()) / np.bincount(ring)
    peak = 0.02 * int(np.argmax(nps))
    assert 0.22 <= peak <= 0.32, f"NPS peak at {peak:.2f} lp/mm"


def test_phantom_series_of_two_kernels_pair_by_tags(tmp_path: Path) -> None:
    generate_phantom_series(tmp_path / "P1" / "a", n_slices=2, size=32, kernel="Br40d")
    generate_phantom_series(
        tmp_path / "P1" / "b", n_slices=2, size=32, kernel="Bl64d", series_number=3
    )
    result = find_paired_series(tmp_path)
    assert [p.n_slices for p in result.paired] == [2]


def test_phantom_cli_writes_series(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "out"), "--slices", "2", "--seed", "4", "--kernel", "B30f"]) == 0
    files = sorted((tmp_path / "out").glob("*.dcm"))
    assert len(files) == 2
    assert dcmread(files[0]).ConvolutionKernel == "B30f"
    assert "wrote 2 B30f phantom slices" in capsys.readouterr().out


def test_phantom_headers_are_the_synthetic_ct_headers(tmp_path: Path) -> None:
    """One writer of synthetic CT headers (engine/synthetic.py): the phantom has the same
    attributes as a synthetic test slice, less the Institution Name it leaves out."""
    phantom = dcmread(generate_phantom_series(tmp_path, n_slices=1, size=32)[0])
    synthetic = make_ct_dataset(rows=32, cols=32)
    assert {e.keyword for e in phantom} == {e.keyword for e in synthetic} - {"InstitutionName"}
    assert phantom.SoftwareVersions == __version__
