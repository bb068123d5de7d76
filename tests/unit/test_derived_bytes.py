"""The derived files stay byte for byte what they were before the fast build and encode.

`DerivedSeriesBuilder` shares series-constant elements between instances and `write_series`
encodes each element kind once per series (engine.part10); both are optimisations only. The
golden digests below are SHA-256 over the files `write_series` wrote, in volume order, for
each kind of source, produced by the reference code (commit 12d7754: per-slice pydicom
construction and `dcmwrite(enforce_file_format=True)`) with the sources and engine output
built here. A change to the derived series that is meant (a new attribute, another value)
changes them: regenerate them with `_digests()` and say why in the commit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import dcmwrite
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ImplicitVRLittleEndian, RLELossless

from engine.derived import DerivedSeriesOptions, build_derived_series
from engine.interface import EngineIdentity
from engine.pipeline import write_series
from engine.series_io import load_series
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

GOLDEN: dict[str, str] = {
    "explicit-latin1": "f91a05f1f0dc770e2af56e8d2ff092ee976f6d36f5499df0f1559444d09d3d87",
    "implicit-signed-padding": "b2dc64e737337117ecd02876dfb99b234bfe275303c00b3801a190a3dfa55e62",
    "rle-equipment-window": "cb70604144f0d846a42980951607155d0db171216d9777793f8c485beacad311",
    "enhanced-ct": "a9a5dc1741678e277fbb1e98013a4db5572f3ac899739a6a29adff20f7db3a10",
    "lossy-j2k-no-frame-of-ref": "988eb6508bb8a644f3f99c2ae918a8f434c3e3f4da8445e3c1f6bbc832766d56",
}


def _derived_files(kind: str, tmp_path: Path) -> list[bytes]:
    make_source, options = SOURCES[kind]
    source_dir = tmp_path / "in"
    source_dir.mkdir()
    loaded = load_series(make_source(source_dir))
    volume = loaded.volume_hu + np.float32(7.0)
    volume[0, 0, :3] = -5000.0  # clipped
    derived = build_derived_series(loaded, volume, IDENTITY, options, now=NOW)
    paths = write_series(derived.datasets, tmp_path / "out")
    return [path.read_bytes() for path in paths]


def _digest(files: list[bytes]) -> str:
    digest = hashlib.sha256()
    for data in files:
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _digests(tmp_path: Path) -> dict[str, str]:
    """The digests of every kind (to regenerate GOLDEN)."""
    out = {}
    for kind in SOURCES:
        (tmp_path / kind).mkdir()
        out[kind] = _digest(_derived_files(kind, tmp_path / kind))
    return out


@pytest.mark.parametrize("kind", list(SOURCES))
def test_derived_files_are_byte_identical_to_the_reference_build(kind: str, tmp_path: Path):
    files = _derived_files(kind, tmp_path)
    assert files, "no files written"
    for data in files:
        assert pydicom.dcmread(__import__("io").BytesIO(data)).SOPClassUID == (
            "1.2.840.10008.5.1.4.1.1.2"
        )
    assert _digest(files) == GOLDEN[kind], f"{kind}: the derived files changed"
