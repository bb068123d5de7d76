"""Reception limits: what the C-STORE handler checks before pydicom ever parses a dataset.

Pure functions over bytes, no I/O. A hostile or broken instance must not be able to take the node
down, so an encoded dataset is bounded *before* it is decoded:

- `inflate_capped`: a Deflated Explicit VR Little Endian dataset (PS3.5 A.5) is inflated with a
  hard cap on its inflated size; a deflate bomb stops at the cap instead of filling memory.
- `scan_structure`: one iterative pass over the element headers (no recursion, no value
  decoding) that refuses sequences nested deeper than a limit, more elements than a limit, and
  declared lengths that run past the end of their container (PS3.5 7.1 data elements, 7.5
  nesting of data sets, A.4 encapsulated pixel data).

`read_header` applies both and decodes the header (everything before Pixel Data), or only the
top-level elements its caller reads (`tags`: the C-STORE handler reads about 25 of a CT header's
55 or more, and pydicom's reader costs per element). Only a dataset that passes both is handed to
pydicom, so pydicom's recursive reader, and everything downstream that walks the dataset (the
derived-series builder), sees a bounded tree.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Collection
from dataclasses import dataclass
from enum import Enum
from io import BytesIO

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

UNDEFINED_LENGTH = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_DELIMITER = 0xFFFEE00D
SEQUENCE_DELIMITER = 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010

#: Explicit VR encodings with a 2-byte reserved field and a 4-byte length (PS3.5 Table 7.1-1).
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_INFLATE_CHUNK = 1 << 20


class DatasetRejectedError(ValueError):
    """The encoded dataset is refused before decoding; `limit` says whether a configured limit
    (rather than malformed structure) was the reason."""

    def __init__(self, reason: str, *, limit: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.limit = limit


@dataclass(frozen=True)
class ReceptionLimits:
    """Bounds on one received instance (config `[listener.limits]`)."""

    max_dataset_bytes: int = 1024 << 20  # after inflation, for a deflated transfer syntax
    max_sequence_depth: int = 16
    max_elements: int = 200_000


@dataclass(frozen=True)
class Structure:
    """What the scan counted: element headers (all nesting levels) and the deepest nesting."""

    elements: int
    max_depth: int
    pixel_data_at: int | None = None  # offset of the top-level Pixel Data element, if any
    #: offset of every top-level element, in order (each runs to the next, the last to the end)
    top_level: tuple[int, ...] = ()


def inflate_capped(data: bytes | bytearray | memoryview, max_bytes: int) -> bytes:
    """Inflate a raw deflate stream (RFC 1951, no zlib header: PS3.5 A.5) to at most `max_bytes`.

    Raises DatasetRejectedError(limit=True) beyond the cap, DatasetRejectedError(limit=False)
    for a stream that is not valid deflate. Memory use is bounded by the cap plus one chunk.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    view = memoryview(data)
    try:
        for start in range(0, len(view), _INFLATE_CHUNK):
            out += inflater.decompress(
                view[start : start + _INFLATE_CHUNK], max_bytes + 1 - len(out)
            )
            while inflater.unconsumed_tail and len(out) <= max_bytes:
                out += inflater.decompress(inflater.unconsumed_tail, max_bytes + 1 - len(out))
            if len(out) > max_bytes:
                break
        if len(out) <= max_bytes:
            out += inflater.flush(max_bytes + 1 - len(out))
    except zlib.error as exc:
        raise DatasetRejectedError(
            f"deflated dataset does not inflate: {exc}", limit=False
        ) from exc
    if len(out) > max_bytes:
        raise DatasetRejectedError(
            f"deflated dataset inflates beyond the limit of {max_bytes >> 20} MB "
            f"({len(data)} bytes on the wire)",
            limit=True,
        )
    return bytes(out)


class _Kind(Enum):
    DATASET = "dataset"  # elements; an item's contents or the top level
    SEQUENCE = "sequence"  # items of a sequence
    FRAGMENTS = "fragments"  # items of encapsulated pixel data (opaque)


@dataclass
class _Container:
    kind: _Kind
    end: int | None  # exclusive end offset; None: undefined length, ends at a delimiter


def _is_sequence(tag: int, vr: bytes | None, length: int, implicit: bool) -> bool:
    if vr == b"SQ":
        return True
    if implicit:
        if length == UNDEFINED_LENGTH:
            return tag != PIXEL_DATA  # PS3.5 7.5.1: undefined length in implicit VR is a sequence
        try:
            return dictionary_VR(tag) == "SQ"
        except KeyError:  # private or unknown tag: opaque bytes
            return False
    # Explicit VR UN with undefined length holds an implicit VR sequence (PS3.5 6.2.2 note).
    return vr == b"UN" and length == UNDEFINED_LENGTH


def scan_structure(
    data: bytes | bytearray | memoryview,
    *,
    implicit_vr: bool,
    little_endian: bool,
    limits: ReceptionLimits,
) -> Structure:
    """Walk the element headers of an encoded dataset (no file meta) iteratively.

    Raises DatasetRejectedError(limit=True) when a limit is exceeded and
    DatasetRejectedError(limit=False) for malformed structure: a declared length past its
    container's end, a truncated header, a delimiter where none belongs, an undefined-length
    sequence without its delimiter.
    """
    buf = memoryview(data)
    total = len(buf)
    endian = "<" if little_endian else ">"
    tag_fmt = struct.Struct(f"{endian}HH")
    u16 = struct.Struct(f"{endian}H")
    u32 = struct.Struct(f"{endian}L")
    vr_at = struct.Struct("2s").unpack_from
    stack = [_Container(_Kind.DATASET, total)]
    depth = max_depth = elements = 0
    pos = 0
    pixel_data_at: int | None = None
    top_level: list[int] = []

    def need(n: int, what: str) -> None:
        limit_end = stack[-1].end if stack[-1].end is not None else total
        if pos + n > limit_end:
            raise DatasetRejectedError(f"truncated {what} at byte {pos}", limit=False)

    while stack:
        top = stack[-1]
        if top.end is not None and pos >= top.end:
            if pos > top.end:
                raise DatasetRejectedError(
                    f"element overruns its container at byte {pos}", limit=False
                )
            stack.pop()
            if top.kind is _Kind.SEQUENCE:
                depth -= 1
            continue
        if len(stack) == 1 and total - pos < 8:
            break  # trailing padding shorter than an element header, tolerated as pydicom does
        if pos >= total:
            raise DatasetRejectedError(
                "undefined-length sequence or item without its delimiter", limit=False
            )
        need(8, "element header")
        group, elem = tag_fmt.unpack_from(buf, pos)
        tag = (group << 16) | elem
        if top.kind is not _Kind.DATASET:
            # Inside a sequence or encapsulated pixel data: items and the sequence delimiter only.
            length = u32.unpack_from(buf, pos + 4)[0]
            pos += 8
            if tag == SEQUENCE_DELIMITER and top.end is None:
                stack.pop()
                if top.kind is _Kind.SEQUENCE:
                    depth -= 1
                continue
            if tag != ITEM:
                raise DatasetRejectedError(
                    f"({group:04X},{elem:04X}) where a sequence item was expected", limit=False
                )
            elements += 1
            if top.kind is _Kind.FRAGMENTS:
                if length == UNDEFINED_LENGTH:
                    raise DatasetRejectedError(
                        "pixel data fragment of undefined length", limit=False
                    )
                need(length, "pixel data fragment")
                pos += length
            elif length == UNDEFINED_LENGTH:
                stack.append(_Container(_Kind.DATASET, None))
            else:
                need(length, "sequence item")
                stack.append(_Container(_Kind.DATASET, pos + length))
        else:
            if tag == ITEM_DELIMITER:
                if top.end is not None or len(stack) == 1:
                    raise DatasetRejectedError(
                        "item delimiter outside an undefined-length item", limit=False
                    )
                pos += 8
                stack.pop()
                continue
            vr: bytes | None = None
            if len(stack) == 1:
                top_level.append(pos)
                if tag == PIXEL_DATA and pixel_data_at is None:
                    pixel_data_at = pos
            if implicit_vr or group == 0xFFFE:
                length = u32.unpack_from(buf, pos + 4)[0]
                pos += 8
            else:
                vr = vr_at(buf, pos + 4)[0]
                if vr in _LONG_VRS:
                    need(12, "element header")
                    length = u32.unpack_from(buf, pos + 8)[0]
                    pos += 12
                else:
                    length = u16.unpack_from(buf, pos + 6)[0]
                    pos += 8
            elements += 1
            # explicit VR (the common case) without the call: what _is_sequence answers
            if (
                (vr == b"SQ" or (vr == b"UN" and length == UNDEFINED_LENGTH))
                if vr is not None and not implicit_vr
                else _is_sequence(tag, vr, length, implicit_vr)
            ):
                depth += 1
                max_depth = max(max_depth, depth)
                if depth > limits.max_sequence_depth:
                    raise DatasetRejectedError(
                        f"sequences nested deeper than {limits.max_sequence_depth} levels",
                        limit=True,
                    )
                if length == UNDEFINED_LENGTH:
                    stack.append(_Container(_Kind.SEQUENCE, None))
                else:
                    need(length, "sequence")
                    stack.append(_Container(_Kind.SEQUENCE, pos + length))
            elif length == UNDEFINED_LENGTH:
                if tag != PIXEL_DATA:
                    raise DatasetRejectedError(
                        f"({group:04X},{elem:04X}) has an undefined length but is not a sequence "
                        "or encapsulated pixel data",
                        limit=False,
                    )
                stack.append(_Container(_Kind.FRAGMENTS, None))
            else:
                if pos + length > (total if top.end is None else top.end):  # need(), unformatted
                    need(length, f"value of ({group:04X},{elem:04X})")
                pos += length
        if elements > limits.max_elements:
            raise DatasetRejectedError(f"more than {limits.max_elements} data elements", limit=True)
    return Structure(
        elements=elements,
        max_depth=max_depth,
        pixel_data_at=pixel_data_at,
        top_level=tuple(top_level),
    )


#: Specific Character Set: always decoded with a subset (the text values depend on it).
SPECIFIC_CHARACTER_SET = 0x00080005


def top_level_subset(
    data: memoryview, structure: Structure, tags: Collection[int], *, little_endian: bool
) -> bytes:
    """The encoded top-level elements before Pixel Data whose tag is in `tags`, byte for byte
    and in their order, plus the first element (pydicom guesses implicit or explicit VR from it,
    so the guess is the one it makes on the whole dataset) and Specific Character Set."""
    end = len(data) if structure.pixel_data_at is None else structure.pixel_data_at
    starts = [s for s in structure.top_level if s < end]
    tag_at = struct.Struct("<HH" if little_endian else ">HH").unpack_from
    pieces: list[memoryview] = []
    for i, start in enumerate(starts):
        group, elem = tag_at(data, start)
        tag = (group << 16) | elem
        if i == 0 or tag in tags or tag == SPECIFIC_CHARACTER_SET:
            stop = starts[i + 1] if i + 1 < len(starts) else end
            pieces.append(data[start:stop])
    return b"".join(pieces)


def read_header(
    dataset: bytes | bytearray | memoryview,
    transfer_syntax: str,
    limits: ReceptionLimits,
    *,
    tags: Collection[int] | None = None,
) -> Dataset:
    """Bound, then decode an encoded dataset (no file meta) up to its Pixel Data; with `tags`,
    only those top-level elements (`top_level_subset`; nested ones come with their sequence).

    The whole dataset is bounded either way: limits and malformed structure are refused alike.
    Raises DatasetRejectedError for a limit or for malformed structure; pydicom's own exceptions for
    what it cannot decode. Values are decoded lazily, on access, by pydicom.
    """
    syntax = UID(transfer_syntax)
    if len(dataset) > limits.max_dataset_bytes:
        raise DatasetRejectedError(
            f"dataset of {len(dataset) >> 20} MB is larger than the limit of "
            f"{limits.max_dataset_bytes >> 20} MB",
            limit=True,
        )
    data = (
        inflate_capped(dataset, limits.max_dataset_bytes)
        if syntax == DeflatedExplicitVRLittleEndian
        else dataset
    )
    implicit, little = syntax.is_implicit_VR, syntax.is_little_endian
    structure = scan_structure(data, implicit_vr=implicit, little_endian=little, limits=limits)
    # pydicom reads from a BytesIO, which copies what it is given: only the header. It ends
    # before Pixel Data, so pydicom needs no stop_when (a call per element).
    view = memoryview(data)
    header = (
        view[: structure.pixel_data_at]
        if tags is None
        else top_level_subset(view, structure, tags, little_endian=little)
    )
    return read_dataset(BytesIO(header), implicit, little)
