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
import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from derived_sources import IDENTITY, NOW, SOURCES

from engine.derived import build_derived_series
from engine.pipeline import _drop_source_pixels, write_series
from engine.series_io import load_series

GOLDEN: dict[str, str] = {
    "explicit-latin1": "f91a05f1f0dc770e2af56e8d2ff092ee976f6d36f5499df0f1559444d09d3d87",
    "implicit-signed-padding": "b2dc64e737337117ecd02876dfb99b234bfe275303c00b3801a190a3dfa55e62",
    "rle-equipment-window": "cb70604144f0d846a42980951607155d0db171216d9777793f8c485beacad311",
    "enhanced-ct": "a9a5dc1741678e277fbb1e98013a4db5572f3ac899739a6a29adff20f7db3a10",
    "lossy-j2k-no-frame-of-ref": "988eb6508bb8a644f3f99c2ae918a8f434c3e3f4da8445e3c1f6bbc832766d56",
}


def _derived_files(kind: str, tmp_path: Path, *, drop_source_pixels: bool = False) -> list[bytes]:
    make_source, options = SOURCES[kind]
    source_dir = tmp_path / "in"
    source_dir.mkdir()
    loaded = load_series(make_source(source_dir))
    if drop_source_pixels:  # as prepare_series does once the engine has run
        _drop_source_pixels(loaded)
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


@pytest.mark.parametrize("drop_source_pixels", [False, True])
@pytest.mark.parametrize("kind", list(SOURCES))
def test_derived_files_are_byte_identical_to_the_reference_build(
    kind: str, drop_source_pixels: bool, tmp_path: Path
):
    files = _derived_files(kind, tmp_path, drop_source_pixels=drop_source_pixels)
    assert files, "no files written"
    for data in files:
        assert pydicom.dcmread(io.BytesIO(data)).SOPClassUID == ("1.2.840.10008.5.1.4.1.1.2")
    assert _digest(files) == GOLDEN[kind], f"{kind}: the derived files changed"
