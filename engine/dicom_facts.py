"""DICOM facts the engine and the node share: UID syntax, the CT SOP classes, functional groups.

One home so that the receiver, the spool and the derived-series validator cannot disagree on
what a valid UID is or which SOP classes are CT. Pure functions, no I/O.

PS3.5 9.1 (UID encoding), PS3.4 B.5 (Storage SOP Classes), PS3.3 C.7.6.16 (Multi-frame
Functional Groups).
"""

from __future__ import annotations

import re

from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
)

#: The multi-frame CT Storage SOP Classes (one instance holds many frames).
MULTI_FRAME_CT_SOP_CLASSES = (EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage)
#: Every CT Storage SOP Class the node accepts and the engine reads.
CT_SOP_CLASSES = (CTImageStorage, *MULTI_FRAME_CT_SOP_CLASSES)

#: The elements that hold an image's pixel data (PS3.3 C.7.6.3, C.7.6.24): what the engine
#: decodes, and what it drops once decoded (the derived series never copies them).
PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def drop_pixel_data(ds: Dataset) -> None:
    """Delete the pixel data elements of `ds` (PIXEL_DATA_KEYWORDS), where present."""
    for keyword in PIXEL_DATA_KEYWORDS:
        if keyword in ds:
            del ds[keyword]


_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")
MAX_UID_LENGTH = 64


def is_valid_uid(value: object) -> bool:
    """True for a syntactically valid DICOM UID (PS3.5 9.1): a str of at most 64 characters,
    at least two dot-separated components (root and suffix), each non-empty, digits only, no
    leading zero except the component "0" itself.

    Only such strings may become file names: they can contain no '/', '..' or NUL.
    """
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_UID_LENGTH
        and _UID.fullmatch(value) is not None
    )


def functional_group_items(ds: Dataset, frame_index: int, macro: str) -> list[Dataset]:
    """The items of functional-group macro `macro` (e.g. "PixelMeasuresSequence") that apply to
    frame `frame_index` (0-based) of a multi-frame dataset, most specific first: the Per-frame
    Functional Groups item, then the Shared Functional Groups item (PS3.3 C.7.6.16). Absent
    sequences, frames or macros are skipped; an empty list when neither has the macro.

    A conforming instance has a macro in one of the two places only; callers that merge both
    let the per-frame item win.
    """
    found: list[Dataset] = []
    for groups_keyword, index in (
        ("PerFrameFunctionalGroupsSequence", frame_index),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        groups = ds.get(groups_keyword)
        if not groups or not 0 <= index < len(groups):
            continue
        items = groups[index].get(macro)
        if items:
            found.append(items[0])
    return found


def is_multi_frame_functional(ds: Dataset) -> bool:
    """True when `ds` carries functional groups (an Enhanced or Legacy Converted instance)."""
    return "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
