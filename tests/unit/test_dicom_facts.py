"""One home for DICOM facts (engine/dicom_facts.py): UID syntax, CT SOP classes, functional groups.

The receiver, the spool and the derived-series validator all use these, so they cannot disagree.
"""

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
)

from engine.dicom_facts import CT_SOP_CLASSES, functional_group_items, is_valid_uid


@pytest.mark.parametrize(
    "uid",
    [
        "1.2.840.10008.5.1.4.1.1.2",
        "0.0",
        "1.0.3",
        "2.25.1234567890",
        "1." + "2" * 62,  # exactly 64 characters
        UID("1.2.3"),  # pydicom's UID is a str
    ],
)
def test_uid_syntax_accepts_ps3_5_9_1_uids(uid):
    assert is_valid_uid(uid), f"{uid!r} follows PS3.5 9.1 and must be accepted"


@pytest.mark.parametrize(
    ("uid", "why"),
    [
        ("", "empty"),
        ("1", "one component: no root and suffix (the derived-series check used to accept it)"),
        ("1.2.3\n", "trailing newline (the derived-series check used to accept it)"),
        (123, "not a str (the derived-series check used to accept str(value))"),
        ("1." + "2" * 63, "65 characters"),
        ("1..2", "empty component"),
        (".1.2", "leading dot"),
        ("1.2.", "trailing dot"),
        ("1.02", "leading zero"),
        ("00.1", "leading zero in the first component"),
        ("1.2a", "letter"),
        ("1.2 ", "space padding"),
        ("1.-2", "sign"),
        ("../../etc/passwd", "path traversal"),
        ("1.2\x00", "NUL"),
        (None, "None"),
    ],
)
def test_uid_syntax_refuses_everything_else(uid, why):
    assert not is_valid_uid(uid), f"{uid!r} must be refused: {why}"


def test_ct_sop_classes_are_pydicoms_constants():
    assert (
        CTImageStorage,
        EnhancedCTImageStorage,
        LegacyConvertedEnhancedCTImageStorage,
    ) == CT_SOP_CLASSES
    assert CTImageStorage == "1.2.840.10008.5.1.4.1.1.2"


def _macro(keyword: str, **values: object) -> Dataset:
    group = Dataset()
    item = Dataset()
    for name, value in values.items():
        setattr(item, name, value)
    setattr(group, keyword, Sequence([item]))
    return group


def test_functional_group_items_are_per_frame_then_shared():
    ds = Dataset()
    ds.SharedFunctionalGroupsSequence = Sequence(
        [_macro("PixelMeasuresSequence", SliceThickness=2.0)]
    )
    ds.PerFrameFunctionalGroupsSequence = Sequence(
        [_macro("PixelMeasuresSequence", SliceThickness=1.0), Dataset()]
    )
    first = functional_group_items(ds, 0, "PixelMeasuresSequence")
    assert [float(item.SliceThickness) for item in first] == [1.0, 2.0]
    second = functional_group_items(ds, 1, "PixelMeasuresSequence")
    assert [float(item.SliceThickness) for item in second] == [2.0], "frame 2 has no own macro"


def test_functional_group_items_tolerate_missing_groups_frames_and_macros():
    ds = Dataset()
    assert functional_group_items(ds, 0, "PixelMeasuresSequence") == []
    ds.PerFrameFunctionalGroupsSequence = Sequence([Dataset()])
    assert functional_group_items(ds, 5, "PixelMeasuresSequence") == []
    assert functional_group_items(ds, -1, "PixelMeasuresSequence") == []
    assert functional_group_items(ds, 0, "CTReconstructionSequence") == []
