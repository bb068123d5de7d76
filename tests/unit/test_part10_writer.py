"""SeriesEncoder: the bytes of dcmwrite(enforce_file_format=True), each shared element once."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from derived_sources import IDENTITY, NOW, SOURCES
from pydicom import dcmwrite
from pydicom.dataset import Dataset

from engine.derived import build_derived_series
from engine.part10_writer import SeriesEncoder
from engine.series_io import load_series


def _dcmwrite(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _derived(kind: str, tmp_path: Path) -> list[Dataset]:
    make_source, options = SOURCES[kind]
    loaded = load_series(make_source(tmp_path))
    volume = loaded.volume_hu + np.float32(3.0)
    return build_derived_series(loaded, volume, IDENTITY, options, now=NOW).datasets


@pytest.mark.parametrize("kind", list(SOURCES))
def test_encoder_gives_dcmwrite_bytes_and_reuses_shared_elements(kind: str, tmp_path: Path):
    """Built twice from fresh reads: the encoder must not rely on elements dcmwrite decoded."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    fast, reference = _derived(kind, tmp_path / "a"), _derived(kind, tmp_path / "b")
    encoder = SeriesEncoder()
    first_misses = 0
    for mine, theirs in zip(fast, reference, strict=True):
        assert encoder.encode(mine) == _dcmwrite(theirs), f"{kind}: {mine.SOPInstanceUID}"
        first_misses = first_misses or encoder.misses
    if len(fast) > 1:
        assert encoder.misses - first_misses < encoder.hits, "shared elements encoded again"


def test_encoder_keys_number_strings_by_their_text_not_their_value(tmp_path: Path):
    """DS "1.0" and "1.00" are equal numbers but different bytes: no memo may mix them."""
    datasets = _derived("explicit-latin1", tmp_path)[:2]
    datasets[0].WindowCenter, datasets[1].WindowCenter = "1.0", "1.00"
    encoder = SeriesEncoder()
    for ds in datasets:
        assert encoder.encode(ds) == _dcmwrite(ds)


def test_datasets_read_from_files_are_written_by_dcmwrite(tmp_path: Path):
    """Outside the fast path's preconditions (a dataset read from a file keeps its original
    encoding) the bytes are still dcmwrite's."""
    path = tmp_path / "x.dcm"
    dcmwrite(path, _derived("implicit-signed-padding", tmp_path)[0], enforce_file_format=True)
    read = pydicom.dcmread(path)
    assert SeriesEncoder().encode(read) == path.read_bytes()


def test_instances_share_no_element_a_caller_could_change_for_all(tmp_path: Path):
    """Series constants are shared between the instances as values, decoded source elements
    are copied sharing only immutable values: assigning an attribute or a value of one
    instance must change neither another instance nor the source."""
    make_source, _ = SOURCES["explicit-latin1"]
    loaded = load_series(make_source(tmp_path))
    first, second = build_derived_series(loaded, loaded.volume_hu, IDENTITY, now=NOW).datasets[:2]
    source = loaded.datasets[0]
    assert source.get_item("ImagePositionPatient").__class__.__name__ == "DataElement", (
        "decoded while loading, so copied rather than shared"
    )
    position = list(source.ImagePositionPatient)
    first.SeriesInstanceUID = "1.2.3"
    first.WindowCenter = "12"
    first.ImagePositionPatient[2] = "999"
    first.ImageType[0] = "ORIGINAL"
    assert second.SeriesInstanceUID != "1.2.3"
    assert second.WindowCenter != 12
    assert second.ImageType[0] == "DERIVED"
    assert list(source.ImagePositionPatient) == position


def _item(**attributes: object) -> Dataset:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def test_sequences_built_in_memory_encode_as_dcmwrite_does(tmp_path: Path):
    """Items encoded element by element: undefined lengths (sequence, item), nested and empty
    sequences, an item with its own character set, a sequence shared between instances."""
    datasets = _derived("explicit-latin1", tmp_path)[:3]
    shared = pydicom.Sequence([_item(CodeValue="1", CodingSchemeDesignator="L", CodeMeaning="Ä")])
    for number, ds in enumerate(datasets):
        inner = _item(CodeValue=str(number), CodingSchemeDesignator="L", CodeMeaning="Süd")
        inner.is_undefined_length_sequence_item = number == 1
        own = _item(SpecificCharacterSet="ISO_IR 192", CodeMeaning="Ω", CodeValue="Z")
        ds.AnatomicRegionSequence = pydicom.Sequence(
            [_item(CodeValue="C", ConceptCodeSequence=pydicom.Sequence([inner])), own]
        )
        ds["AnatomicRegionSequence"].is_undefined_length = number == 2
        ds.RequestAttributesSequence = pydicom.Sequence([])
        ds.ReasonForPerformedProcedureCodeSequence = shared
    expected = [_dcmwrite(copy.deepcopy(ds)) for ds in datasets]
    encoder = SeriesEncoder()
    assert [encoder.encode(ds) for ds in datasets] == expected
