"""Sources of several kinds for the derived-series byte-identity tests (test_derived_bytes,
test_part10_writer): storage, transfer syntax, character set, Enhanced CT, lossy, equipment."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
from pydicom import dcmwrite
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ImplicitVRLittleEndian, RLELossless

from engine.derived import DerivedSeriesOptions
from engine.interface import EngineIdentity
from engine.synthetic import make_ct_series

IDENTITY = EngineIdentity(
    name="linear-filter",
    version="0.1.0",
    weights_sha256="0123456789abcdef" * 4,
    source_kernel="Br40d",
    target_kernel="Bl64d",
)
NOW = datetime(2024, 5, 6, 7, 8, 9)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _write(tmp_path: Path, datasets: list[Dataset], **kwargs: object) -> list[Path]:
    paths = []
    for i, ds in enumerate(datasets):
        path = tmp_path / f"src{i:03}.dcm"
        dcmwrite(path, ds, enforce_file_format=True, **kwargs)  # type: ignore[arg-type]
        paths.append(path)
    return paths


def _explicit_latin1(tmp_path: Path) -> list[Path]:
    """Explicit VR LE, unsigned 12-bit, latin-1 text, a private tag, a code sequence."""
    datasets = make_ct_series(4, 16, 16)
    for ds in datasets:
        ds.add_new(0x00091010, "LO", "vendor secret")
        ds.InstitutionName = "Klinik Süd"
        ds.ProcedureCodeSequence = Sequence([_code("X1", "99TEST", "Prozedur Ä")])
        ds.StationName = "CT01"
    return _write(tmp_path, datasets)


def _implicit_signed_padding(tmp_path: Path) -> list[Path]:
    """Implicit VR LE, signed 16-bit, Pixel Padding and image extremes (US or SS VRs)."""
    datasets = make_ct_series(
        3, 16, 16, bits_stored=16, pixel_representation=1, rescale_intercept=0.0
    )
    for ds in datasets:
        ds.PixelPaddingValue = -1000
        ds.SmallestImagePixelValue = -1000
        ds.LargestImagePixelValue = 1000
        ds["PixelPaddingValue"].VR = ds["SmallestImagePixelValue"].VR = "SS"
        ds["LargestImagePixelValue"].VR = "SS"
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    return _write(tmp_path, datasets, implicit_vr=True)


def _rle_with_equipment(tmp_path: Path) -> list[Path]:
    """RLE Lossless, scanner already in Contributing Equipment, a VOI LUT Function."""
    datasets = make_ct_series(3, 16, 16, uid_seed="rle")
    for ds in datasets:
        scanner = Dataset()
        scanner.Manufacturer = "Scanner Inc"
        scanner.PurposeOfReferenceCodeSequence = Sequence(
            [_code("109101", "DCM", "Acquisition Equipment")]
        )
        ds.ContributingEquipmentSequence = Sequence([scanner])
        ds.VOILUTFunction = "LINEAR"
        ds.compress(RLELossless, generate_instance_uid=False)
    return _write(tmp_path, datasets)


def _testdata(name: str) -> Callable[[Path], list[Path]]:
    def paths(tmp_path: Path) -> list[Path]:
        path = get_testdata_file(name)
        if path is None:
            pytest.skip(f"{name} not available")
        return [Path(path)]

    return paths


SOURCES: dict[str, tuple[Callable[[Path], list[Path]], DerivedSeriesOptions | None]] = {
    "explicit-latin1": (_explicit_latin1, None),
    "implicit-signed-padding": (_implicit_signed_padding, None),
    "rle-equipment-window": (
        _rle_with_equipment,
        DerivedSeriesOptions(window_center_width=None),
    ),
    "enhanced-ct": (_testdata("eCT_Supplemental.dcm"), None),
    "lossy-j2k-no-frame-of-ref": (_testdata("693_J2KI.dcm"), None),
}
