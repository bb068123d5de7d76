"""Encode the instances of one derived series as DICOM files, each shared element once.

The instances of a derived series differ in a handful of elements (UIDs, position, instance
number, source reference, pixels); pydicom's `dcmwrite` re-encodes all ~100 of them for every
file, decoding the ones still raw from the source first. `SeriesEncoder` gives the same bytes
as `dcmwrite(enforce_file_format=True)` while encoding each distinct element once per series:
an element's encoding is a pure function of its tag, VR and value (raw bytes for an element not
decoded yet, with the byte order and VR implicitness it was read with) and of the few dataset
attributes pydicom consults (Specific Character Set for text, Pixel Representation and Bits
Allocated for the VR of ambiguous elements), so the encoder remembers it under exactly those.
A miss is encoded by pydicom itself (`write_data_element`, after the ambiguous-VR correction
`write_dataset` would apply), so the bytes never depend on the memo.

Only datasets built in memory with a file meta saying Explicit VR Little Endian (what
`engine.derived` produces) take this path; anything else is written by `dcmwrite`.
Standard: PS3.10 7.1 (file meta), PS3.5 7.1 (data elements), 7.5 (sequences).
"""

from __future__ import annotations

import struct
from decimal import Decimal
from typing import Any

from pydicom import __version_info__ as _pydicom_version
from pydicom import config
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import (
    correct_ambiguous_vr,
    correct_ambiguous_vr_element,
    dcmwrite,
    write_data_element,
)
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian
from pydicom.valuerep import AMBIGUOUS_VR

_PREAMBLE = b"\x00" * 128
_UNDEFINED = b"\xff\xff\xff\xff"
_ITEM = b"\xfe\xff\x00\xe0"  # (FFFE,E000)
_ITEM_END = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"  # (FFFE,E00D), length 0
_SEQUENCE_END = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"  # (FFFE,E0DD), length 0
_MAX_KEYED_BYTES = 16384
"""Bytes values longer than this are encoded every time (hashing them would not pay)."""

_PIXEL_DATA = 0x7FE00010
_META_GROUP_LENGTH = 0x00020000
_REQUIRED_META = (0x00020002, 0x00020003, 0x00020010)
_SIMPLE_TYPES = (str, UID, int, bytes)
_NUMBER_TYPES = (str, int, float, Decimal)

_Key = tuple[Any, ...]


def _value_key(value: object) -> tuple[Any, ...] | None:
    """A hashable stand-in for `value` that differs whenever its encoding may differ: exact
    types only (a DS "1.0" and "1.00" compare equal as numbers but encode differently, so
    number values, floats and person names are not keyed here; `element_key` keys DS and IS
    by their text); None for values not keyed."""
    kind = type(value)
    if kind in _SIMPLE_TYPES:
        if kind is bytes and len(value) > _MAX_KEYED_BYTES:  # type: ignore[arg-type]
            return None
        return (kind, value)
    if isinstance(value, MultiValue | list) and kind in (MultiValue, list):
        items = tuple(value)
        if all(type(item) in (str, UID, int) for item in items):
            return (kind, tuple((type(item), item) for item in items))
    return None


def _number_text(value: object) -> tuple[str, str] | None:
    """What pydicom writes for a DS or IS value (`filewriter.write_number_string`: the string
    it was read or set as, else str()), so equal texts encode alike; None for values of other
    kinds (numpy arrays among them)."""
    if value is None:
        return ("none", "")
    items = value if isinstance(value, MultiValue | list | tuple) else None
    for item in items if items is not None else (value,):
        if not isinstance(item, _NUMBER_TYPES):
            return None
    if items is not None:
        return ("multi", "\\".join(_number_string(item) for item in items))
    return ("single", _number_string(value))


def _number_string(value: object) -> str:
    original = getattr(value, "original_string", None)
    return original if isinstance(original, str) else str(value)


def element_key(element: DataElement | RawDataElement) -> tuple[Any, ...] | None:
    """A hashable key equal for two elements (of one tag) exactly when they are the same raw
    bytes read the same way, or decoded values of the same VR, exact type and value; None for
    elements not keyed (sequences and other values of no simple type, deferred or long
    values)."""
    if isinstance(element, RawDataElement):
        if element.value is None or len(element.value) > _MAX_KEYED_BYTES:
            return None
        return (
            "raw",
            element.VR,
            element.length,
            element.value,
            element.is_implicit_VR,
            element.is_little_endian,
        )
    if element.is_buffered or element.is_undefined_length or element.VR == "SQ":
        return None
    if element.VR in ("DS", "IS"):
        text = _number_text(element.value)
        return None if text is None else ("value", element.VR, text)
    value = _value_key(element.value)
    return None if value is None else ("value", element.VR, value)


def _hashable(charset: object) -> object:
    return tuple(charset) if isinstance(charset, MultiValue | list) else charset


def _is_plain_sequence(element: DataElement) -> bool:
    """A sequence whose items were built in memory of decoded elements only: encoded here item
    by item. Items read from a file keep their original encoding and raw elements, which
    `write_dataset` treats otherwise; pydicom encodes those sequences."""
    return (
        element.VR == "SQ"
        and not element.is_buffered
        and all(
            item.original_encoding == (None, None)
            and not any(isinstance(e, RawDataElement) for e in item.elements())
            for item in element.value
        )
    )


def _pixel_data_pieces(element: DataElement | RawDataElement) -> list[bytes] | None:
    """Header and value of native Pixel Data as `write_data_element` writes them (OB / OW of
    even length: tag, VR, reserved, 32-bit length, the bytes as they are); None for any other
    kind, which pydicom encodes."""
    if not isinstance(element, DataElement) or element.VR not in ("OB", "OW"):
        return None
    value = element.value
    if element.is_buffered or element.is_undefined_length or type(value) is not bytes:
        return None
    if len(value) % 2 or len(value) > 0xFFFFFFFE:
        return None
    tag = element.tag
    header = struct.pack("<HH2s2xL", tag.group, tag.element, element.VR.encode(), len(value))
    return [header, value]


def _is_ambiguous_tag(tag: int, cache: dict[int, bool]) -> bool:
    known = cache.get(tag)
    if known is None:
        try:
            known = dictionary_VR(tag) in AMBIGUOUS_VR
        except KeyError:
            known = True  # unknown to the dictionary: never keyed
        cache[tag] = known
    return known


class SeriesEncoder:
    """Encodes datasets to DICOM File Format bytes, remembering element encodings.

    Meant for the instances of one series written together (`engine.pipeline.write_series`
    makes one per call): a Sequence value is remembered by identity, so the datasets must not
    change while the encoder lives.
    """

    def __init__(self) -> None:
        self._encoded: dict[_Key, bytes] = {}
        self._pinned: dict[int, object] = {}  # sequences keyed by id() stay alive
        self._ambiguous: dict[int, bool] = {}
        self.hits = 0
        self.misses = 0

    def encode(self, ds: Dataset) -> bytes:
        """The bytes `dcmwrite(fp, ds, enforce_file_format=True)` writes for `ds`."""
        return b"".join(self.encode_pieces(ds))

    def encode_pieces(self, ds: Dataset) -> tuple[bytes, ...]:
        """`encode(ds)` in pieces to be written one after the other (writev), so that the
        Pixel Data value is never copied."""
        meta = self._meta_bytes(ds) if self._takes_fast_path(ds) else None
        if meta is None:
            return (_dcmwrite_bytes(ds),)
        preamble = getattr(ds, "preamble", None) or _PREAMBLE
        if "PixelData" in ds:
            ds["PixelData"].is_undefined_length = False  # as dcmwrite does for native data
        return (preamble + b"DICM" + meta, *self._dataset_pieces(ds))

    @staticmethod
    def _takes_fast_path(ds: Dataset) -> bool:
        meta = getattr(ds, "file_meta", None)
        preamble = getattr(ds, "preamble", None)
        return (
            meta is not None
            and meta.get("TransferSyntaxUID") == ExplicitVRLittleEndian
            and ds.original_encoding == (None, None)
            and not config._use_future
            and (not preamble or len(preamble) == 128)
            # Dataset iteration decodes elements; its keys are the tags.
            and not any(tag >> 16 in (0, 2) for tag in ds.keys())  # noqa: SIM118
        )

    def _dataset_pieces(self, ds: Dataset) -> list[bytes]:
        """The dataset's elements: those before Pixel Data joined, Pixel Data's header and its
        value (not copied), then any after it joined."""
        charset = ds.get("SpecificCharacterSet", default_encoding)
        context = (_hashable(charset), ds.get("PixelRepresentation"), ds.get("BitsAllocated"))
        return self._element_pieces(ds, charset, context, top_level=True)

    def _elements_bytes(
        self, ds: Dataset, charset: object, context: _Key, *, top_level: bool
    ) -> bytes:
        return b"".join(self._element_pieces(ds, charset, context, top_level=top_level))

    def _element_pieces(
        self, ds: Dataset, charset: object, context: _Key, *, top_level: bool
    ) -> list[bytes]:
        """The elements of `ds` (the dataset, or an item built in memory) in tag order, each
        from the memo or encoded as `write_dataset` would; `charset`: the encodings its text
        is written with; `context`: what else their encoding may depend on. Runs of elements
        come joined; native Pixel Data as its header and its value."""
        pieces: list[bytes] = []
        run: list[bytes] = []
        for tag in sorted(ds.keys()):
            if tag.element == 0 and tag.group > 6:
                continue  # retired group lengths are not written (PS3.5 7.2)
            element = ds.get_item(tag)
            pixels = _pixel_data_pieces(element) if tag == _PIXEL_DATA and top_level else None
            if pixels is not None:
                pieces += [b"".join(run), *pixels]
                run = []
                continue
            key = self._key(element, context)
            encoded = self._encoded.get(key) if key is not None else None
            if encoded is None:
                encoded = self._encode_element(ds, tag, charset, context, top_level=top_level)
                self.misses += 1
                if key is not None:
                    self._encoded[key] = encoded
            else:
                self.hits += 1
            run.append(encoded)
        return [*pieces, b"".join(run)]

    def _key(self, element: DataElement | RawDataElement, context: _Key) -> _Key | None:
        tag = element.tag
        if tag == _PIXEL_DATA or _is_ambiguous_tag(tag, self._ambiguous):
            return None
        if isinstance(element, DataElement) and element.VR == "SQ" and not element.is_buffered:
            self._pinned[id(element.value)] = element.value
            return ("sq", tag, id(element.value), element.is_undefined_length, context)
        key = element_key(element)
        return None if key is None else (tag, key, context)

    def _encode_element(
        self, ds: Dataset, tag: BaseTag, charset: object, context: _Key, *, top_level: bool
    ) -> bytes:
        """One element as `write_dataset` encodes it for a dataset built in memory: ambiguous
        VRs corrected (at the top level, in sequence items too, as its first pass does; in an
        item that pass already did it), raw elements decoded, then written in Explicit VR
        Little Endian. A sequence of items built in memory is encoded item by item here, so
        that what its items share comes from the memo."""
        current = ds.get_item(tag)
        if top_level and current.VR == "SQ":
            for item in ds[tag].value:
                correct_ambiguous_vr(item, True, [item, ds])
        elif top_level and current.VR in AMBIGUOUS_VR:
            correct_ambiguous_vr_element(current, ds, True, [ds])
        element = ds[tag]
        if isinstance(current, DataElement) and _is_plain_sequence(element):
            return self._sequence_bytes(element, charset, context)
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, False
        write_data_element(buffer, element, charset)  # type: ignore[arg-type]
        return buffer.getvalue()

    def _sequence_bytes(self, element: DataElement, charset: object, context: _Key) -> bytes:
        """A sequence as `write_data_element` / `write_sequence_item` encode it (PS3.5 7.5):
        explicit length unless the element or item says undefined, items' text in their own
        Specific Character Set, else the parent's."""
        parent = convert_encodings(charset or [default_encoding])  # type: ignore[arg-type]
        parts = []
        for item in element.value:
            item_charset = item.get("SpecificCharacterSet", parent)
            item_context = ("item", _hashable(item_charset), context)
            body = self._elements_bytes(item, item_charset, item_context, top_level=False)
            if item.is_undefined_length_sequence_item:
                parts += [_ITEM + _UNDEFINED, body, _ITEM_END]
            else:
                parts += [_ITEM + len(body).to_bytes(4, "little"), body]
        value = b"".join(parts)
        header = struct.pack("<HH", element.tag.group, element.tag.element) + b"SQ\0\0"
        if element.is_undefined_length:
            return header + _UNDEFINED + value + _SEQUENCE_END
        return header + len(value).to_bytes(4, "little") + value

    def _meta_bytes(self, ds: Dataset) -> bytes | None:
        """File Meta Information as dcmwrite(enforce_file_format=True) completes and writes it
        (PS3.10 7.1), or None when it is not of the simple kind handled here."""
        elements: dict[int, tuple[str, object]] = {}
        for element in ds.file_meta.elements():
            if isinstance(element, RawDataElement) or _value_key(element.value) is None:
                return None
            elements[element.tag] = (element.VR, element.value)
        for meta_tag, keyword in ((0x00020002, "SOPClassUID"), (0x00020003, "SOPInstanceUID")):
            in_meta = elements.get(meta_tag, (None, None))[1]
            in_ds = ds.get(keyword)
            if in_meta is None or (in_ds and in_ds != in_meta):
                elements[meta_tag] = ("UI", in_ds)
        if not elements.get(0x00020001, ("", b""))[1]:
            elements[0x00020001] = ("OB", b"\x00\x01")
        if not elements.get(0x00020012, ("", ""))[1]:
            elements[0x00020012] = ("UI", UID(PYDICOM_IMPLEMENTATION_UID))
        if 0x00020013 not in elements:
            elements[0x00020013] = ("SH", f"PYDICOM {'.'.join(_pydicom_version)}")
        if any(not elements.get(tag, ("", None))[1] for tag in _REQUIRED_META):
            return None  # dcmwrite raises the error that says which is missing
        body = b"".join(
            self._meta_element(tag, vr, value)
            for tag, (vr, value) in sorted(elements.items())
            if tag != _META_GROUP_LENGTH
        )
        return self._meta_element(_META_GROUP_LENGTH, "UL", len(body)) + body

    def _meta_element(self, tag: int, vr: str, value: object) -> bytes:
        key = ("meta", tag, vr, _value_key(value))
        encoded = self._encoded.get(key)
        if encoded is None:
            buffer = DicomBytesIO()
            buffer.is_little_endian, buffer.is_implicit_VR = True, False
            write_data_element(buffer, DataElement(Tag(tag), vr, value))
            encoded = buffer.getvalue()
            if tag != _META_GROUP_LENGTH:
                self._encoded[key] = encoded
        return encoded


def _dcmwrite_bytes(ds: Dataset) -> bytes:
    buffer = DicomBytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()
