"""Pure transforms between DICOM pixel data and Hounsfield units.

Every function here takes arrays and datasets in and hands a new array out (or, for
`write_pixels`, sets the pixel data of the dataset it is given); nothing reads or writes files.
The model is pydicom's `pixels.processing.apply_modality_lut`.

References to the DICOM Standard:

- PS3.3 C.7.6.3 Image Pixel Module: Rows, Columns, Samples per Pixel, Photometric
  Interpretation, Bits Allocated / Stored, High Bit, Pixel Representation, Pixel Data.
- PS3.3 C.11.1 Modality LUT Module: the transform from stored values to output units,
  either linear (Rescale Slope / Intercept) or a Modality LUT Sequence.
- PS3.3 C.8.2.1 CT Image Module: Rescale Intercept / Slope are Type 1 for CT and the output
  unit of the modality transform is HU (Rescale Type "HU" or absent).
- PS3.3 C.7.6.16.2.9 Pixel Value Transformation Macro: the same rescale, per frame, for
  Enhanced CT.
- PS3.5 A.4: encapsulated (compressed) transfer syntaxes.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_modality_lut
from pydicom.pixels.utils import pixel_array
from pydicom.uid import UID, ExplicitVRLittleEndian

from engine.dicom_facts import functional_group_items, is_multi_frame_functional

FloatArray = npt.NDArray[np.float32]
StoredArray = npt.NDArray[np.integer]

_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_BITS_ALLOCATED = (8, 16, 32)

# Which pip package provides a decoder, for the error message when none is installed.
_PLUGIN_HINTS = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg-libjpeg",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": "pylibjpeg-libjpeg",  # JPEG Extended
    "1.2.840.10008.1.2.4.57": "pylibjpeg-libjpeg",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70": "pylibjpeg-libjpeg",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": "pylibjpeg-libjpeg",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "pylibjpeg-libjpeg",  # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.90": "pylibjpeg-openjpeg",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": "pylibjpeg-openjpeg",  # JPEG 2000
    "1.2.840.10008.1.2.4.201": "pylibjpeg-openjpeg",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202": "pylibjpeg-openjpeg",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203": "pylibjpeg-openjpeg",  # HTJ2K
    "1.2.840.10008.1.2.5": "pylibjpeg-rle",  # RLE Lossless
}


class PixelFormatError(ValueError):
    """Pixel data this node cannot turn into HU, or HU it cannot store back.

    The message says what is wrong and, where it helps, what to install or change.
    """


def _label(ds: Dataset) -> str:
    """Name a dataset in messages by SOP Instance UID (never by patient data)."""
    uid = ds.get("SOPInstanceUID")
    return f"instance {uid}" if uid else "dataset without SOPInstanceUID"


def transfer_syntax_of(ds: Dataset) -> UID:
    """The transfer syntax the pixel data are encoded in (file meta, else the dataset's own)."""
    file_meta = getattr(ds, "file_meta", None)
    if file_meta is not None and "TransferSyntaxUID" in file_meta:
        return UID(file_meta.TransferSyntaxUID)
    return ExplicitVRLittleEndian


def check_pixel_format(ds: Dataset) -> None:
    """Raise PixelFormatError unless `ds` holds grayscale integer pixels we can decode.

    Checks the Image Pixel Module (PS3.3 C.7.6.3) and that a decoder for the transfer syntax
    (PS3.5 A.4) is installed.
    """
    label = _label(ds)
    if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
        raise PixelFormatError(
            f"{label}: float pixel data (Float/Double Float Pixel Data) cannot be processed; "
            "only integer Pixel Data (7FE0,0010) is supported"
        )
    if "PixelData" not in ds:
        raise PixelFormatError(f"{label}: has no Pixel Data (7FE0,0010)")
    samples = int(ds.get("SamplesPerPixel", 1))
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if samples != 1 or photometric not in _MONOCHROME:
        raise PixelFormatError(
            f"{label}: colour or multi-sample image (Photometric Interpretation "
            f"{photometric or 'missing'!r}, Samples per Pixel {samples}); only MONOCHROME1 / "
            "MONOCHROME2 grayscale CT can be processed"
        )
    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation"):
        if ds.get(keyword) is None:
            raise PixelFormatError(f"{label}: Image Pixel Module attribute {keyword} is missing")
    bits_allocated = int(ds.BitsAllocated)
    if bits_allocated not in _BITS_ALLOCATED:
        raise PixelFormatError(
            f"{label}: Bits Allocated {bits_allocated} is not supported (8, 16 or 32 required)"
        )
    bits_stored = int(ds.BitsStored)
    if not 1 <= bits_stored <= bits_allocated:
        raise PixelFormatError(
            f"{label}: Bits Stored {bits_stored} is outside 1..Bits Allocated ({bits_allocated})"
        )
    tsyntax = transfer_syntax_of(ds)
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise PixelFormatError(
            f"{label}: no pixel decoder exists for transfer syntax {tsyntax} "
            f"({tsyntax.name}); ask the sender to transmit uncompressed or lossless data"
        ) from None
    if not decoder.is_available:
        hint = _PLUGIN_HINTS.get(str(tsyntax), "a pydicom pixel-data plugin")
        raise PixelFormatError(
            f"{label}: no decoder installed for transfer syntax {tsyntax} ({tsyntax.name}); "
            f"install {hint} into the node's environment"
        )


def frame_count(ds: Dataset) -> int:
    """Number of frames (Number of Frames (0028,0008), 1 when absent)."""
    value = ds.get("NumberOfFrames")
    return 1 if value in (None, "") else max(int(value), 1)


def decode_stored(ds: Dataset) -> StoredArray:
    """Decode Pixel Data to stored values, shape (frames, rows, columns).

    dtype: the integer type given by Bits Allocated and Pixel Representation, native byte order.
    Units: stored values (before the Modality LUT, PS3.3 C.11.1). Raises PixelFormatError.
    """
    stored = _decode_stored(ds)
    return stored if stored.flags.writeable else stored.copy()


def _decode_stored(ds: Dataset) -> StoredArray:
    """`decode_stored`, possibly a read-only view on the Pixel Data bytes."""
    check_pixel_format(ds)
    native = _native_stored(ds)
    if native is not None:
        return native
    try:
        # as_rgb=False: keep YBR/MONO values as stored; we only accept MONOCHROME anyway.
        stored = pixel_array(ds, as_rgb=False)
    except (RuntimeError, ValueError, NotImplementedError, AttributeError) as exc:
        raise PixelFormatError(
            f"{_label(ds)}: pixel data could not be decoded ({transfer_syntax_of(ds).name}): {exc}"
        ) from exc
    rows, cols = int(ds.Rows), int(ds.Columns)
    stored = stored.reshape(-1, rows, cols)
    if stored.shape[0] != frame_count(ds):
        raise PixelFormatError(
            f"{_label(ds)}: decoded {stored.shape[0]} frames but Number of Frames is "
            f"{frame_count(ds)}"
        )
    return stored.astype(stored.dtype.newbyteorder("="), copy=False)


_NATIVE_LITTLE_ENDIAN = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"})


def _native_stored(ds: Dataset) -> StoredArray | None:
    """Uncompressed little-endian Pixel Data as a view on its bytes, shape (frames, rows,
    columns), exactly what pydicom's native decoder returns: unused high bits removed (shifted
    out, sign-extended when signed, as pydicom's `correct_unused_bits`). None when the data are
    not of the plain kind handled here (compressed, big endian, a length other than the
    expected one, attribute values pydicom would reject or warn about): pydicom decodes those
    and says what is wrong. Call after `check_pixel_format`."""
    if str(transfer_syntax_of(ds)) not in _NATIVE_LITTLE_ENDIAN:
        return None
    data = ds.PixelData
    rows, cols = int(ds.Rows), int(ds.Columns)
    frames_value = ds.get("NumberOfFrames")
    frames = 1 if frames_value in (None, "") else int(frames_value)
    representation = int(ds.PixelRepresentation)
    if (
        not isinstance(data, bytes)
        or not (0 < rows < 2**16 and 0 < cols < 2**16 and frames >= 1)
        or representation not in (0, 1)
    ):
        return None
    dtype = storage_dtype(ds).newbyteorder("<")
    expected = rows * cols * frames * dtype.itemsize
    if len(data) not in (expected, expected + expected % 2):
        return None
    stored = np.frombuffer(data, dtype=dtype, count=rows * cols * frames)
    stored = stored.reshape(frames, rows, cols).astype(dtype.newbyteorder("="), copy=False)
    unused = int(ds.BitsAllocated) - int(ds.BitsStored)
    if unused:
        stored = stored.copy()
        np.left_shift(stored, unused, out=stored)
        np.right_shift(stored, unused, out=stored)
    return stored


def _float(value: object, default: float) -> float:
    if value is None or value == "":
        return default
    return float(value)  # type: ignore[arg-type]


def modality_rescale(ds: Dataset, frame_index: int | None = None) -> tuple[float, float] | None:
    """Linear modality transform (slope, intercept) of a dataset or one of its frames.

    For a multi-frame dataset and a frame index, the Pixel Value Transformation Sequence of the
    frame's functional groups is used (PS3.3 C.7.6.16.2.9), then the top-level Rescale Slope /
    Intercept (PS3.3 C.11.1). Returns None when the dataset has neither; the Standard then
    defines stored values as the output units.
    """
    if frame_index is not None:
        items = functional_group_items(ds, frame_index, "PixelValueTransformationSequence")
        if items and "RescaleIntercept" in items[0]:
            item = items[0]
            return _float(item.get("RescaleSlope"), 1.0), _float(item.RescaleIntercept, 0.0)
    if ds.get("RescaleIntercept") is not None and ds.RescaleIntercept != "":
        return _float(ds.get("RescaleSlope"), 1.0), _float(ds.RescaleIntercept, 0.0)
    return None


def dataset_frames_to_hu(ds: Dataset, out: FloatArray | None = None) -> FloatArray:
    """Decode all frames of `ds` and apply the Modality LUT (PS3.3 C.11.1).

    Supports every transfer syntax pydicom has a decoder for in this environment (uncompressed,
    deflated, JPEG lossless, JPEG-LS, JPEG 2000, RLE through the pylibjpeg plugins).

    Returns float32 (frames, rows, columns) in the output units of the modality transform,
    which for CT is HU (PS3.3 C.8.2.1.1.6 / Rescale Type). Per-frame rescale of Enhanced CT
    comes from the Pixel Value Transformation functional group. A Modality LUT Sequence is
    applied through pydicom's `apply_modality_lut`. `out`: a float32 array of that shape to
    write into (and return) instead of a new one. Raises PixelFormatError.
    """
    stored = _decode_stored(ds)
    if out is None:
        out = np.empty(stored.shape, dtype=np.float32)
    elif out.shape != stored.shape or out.dtype != np.float32:
        raise ValueError(f"out is {out.dtype} {out.shape}, expected float32 {stored.shape}")
    multi_frame = is_multi_frame_functional(ds)
    for index in range(stored.shape[0]):
        rescale = modality_rescale(ds, index if multi_frame else None)
        if rescale is not None:
            _rescale_into(stored[index], *rescale, out[index])
        elif "ModalityLUTSequence" in ds:
            out[index] = apply_modality_lut(stored[index], ds).astype(np.float32)
        else:
            out[index] = stored[index]
    return out


def _rescale_into(stored: StoredArray, slope: float, intercept: float, out: FloatArray) -> None:
    """out = float32(stored * slope + intercept), computed in float64 (exact for 16-bit
    integers and usual slopes). With slope 1, an integral intercept within 2**23 and at most
    16-bit values, every operand and result is an integer below 2**24, which float32 holds
    exactly: then the sum is taken in float32 directly, with the same result."""
    if (
        slope == 1.0
        and float(intercept).is_integer()
        and abs(intercept) <= 2**23
        and stored.dtype.itemsize <= 2
    ):
        np.add(stored, np.float32(intercept), out=out, dtype=np.float32)
    else:
        out[...] = stored.astype(np.float64) * slope + intercept


def dataset_to_hu(ds: Dataset) -> FloatArray:
    """Decode a single-frame image to float32 (rows, columns) in HU.

    Same transform as `dataset_frames_to_hu`; raises PixelFormatError when `ds` has more than
    one frame (use `dataset_frames_to_hu` for those).
    """
    if frame_count(ds) != 1:
        raise PixelFormatError(
            f"{_label(ds)}: has {frame_count(ds)} frames; use dataset_frames_to_hu for multi-frame"
        )
    frame: FloatArray = dataset_frames_to_hu(ds)[0]
    return frame


def storage_dtype(ds: Dataset) -> np.dtype[np.integer]:
    """Numpy dtype for Bits Allocated and Pixel Representation (PS3.3 C.7.6.3.1.3)."""
    bits_allocated = int(ds.BitsAllocated)
    if bits_allocated not in _BITS_ALLOCATED:
        raise PixelFormatError(f"Bits Allocated {bits_allocated} cannot be written")
    signed = int(ds.PixelRepresentation) == 1
    return np.dtype(f"{'i' if signed else 'u'}{bits_allocated // 8}")


def stored_value_range(ds: Dataset) -> tuple[int, int]:
    """Smallest and largest stored value that Bits Stored and Pixel Representation allow.

    Unsigned: 0 .. 2**BitsStored - 1; signed (two's complement): -2**(BitsStored-1) ..
    2**(BitsStored-1) - 1 (PS3.5 8.1.1).
    """
    bits_stored = int(ds.BitsStored)
    if int(ds.PixelRepresentation) == 1:
        return -(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1
    return 0, 2**bits_stored - 1


def hu_to_stored(hu: npt.NDArray[np.floating], ref_ds: Dataset) -> tuple[StoredArray, int]:
    """Invert the linear modality transform of `ref_ds`: HU -> stored values.

    stored = round((hu - intercept) / slope) (round half to even), clipped to the range
    Bits Stored and Pixel Representation of `ref_ds` can represent (`stored_value_range`),
    cast to the dtype of Bits Allocated / Pixel Representation (`storage_dtype`).

    `hu`: float array in HU, any shape. Returns (stored array of the same shape, number of
    pixels that were clipped). `ref_ds` must have top-level Rescale Slope / Intercept
    (PS3.3 C.11.1); a Modality LUT Sequence cannot be inverted and raises PixelFormatError, as
    do non-finite values or a zero slope. Pure: `hu` and `ref_ds` are not modified.
    """
    if "ModalityLUTSequence" in ref_ds:
        raise PixelFormatError(
            f"{_label(ref_ds)}: a Modality LUT Sequence cannot be inverted; only Rescale "
            "Slope / Intercept storage is supported for output"
        )
    rescale = modality_rescale(ref_ds)
    slope, intercept = rescale if rescale is not None else (1.0, 0.0)
    if slope == 0.0:
        raise PixelFormatError(f"{_label(ref_ds)}: Rescale Slope is 0")
    source = np.asarray(hu)
    low, high = stored_value_range(ref_ds)
    dtype = storage_dtype(ref_ds)
    if not source.size:
        return np.zeros(source.shape, dtype=dtype), 0
    with np.errstate(invalid="ignore"):
        extremes = (source.min(), source.max())
    if not (np.isfinite(extremes[0]) and np.isfinite(extremes[1])):  # NaN propagates into them
        raise PixelFormatError("HU array contains NaN or infinite values; nothing can store them")
    # The transform is monotonic (each IEEE operation is), so the extremes of the result are
    # those of the input transformed: when they fit, nothing is clipped and the slice is
    # transformed block by block, in cache; otherwise as a whole, counting and clipping.
    ends = [_hu_to_stored_values(np.asarray(e), slope, intercept) for e in extremes]
    if low <= min(ends) and max(ends) <= high:
        stored = np.empty(source.shape, dtype=dtype)
        flat_in, flat_out = source.reshape(-1), stored.reshape(-1)
        scratch = np.empty(min(flat_in.size, _BLOCK), dtype=np.float64)
        for start in range(0, flat_in.size, _BLOCK):
            block = slice(start, start + _BLOCK)
            values = scratch[: flat_in[block].size]
            values[...] = flat_in[block]
            flat_out[block] = _to_stored_in_place(values, slope, intercept)
        return stored, 0
    scaled = _hu_to_stored_values(source, slope, intercept)
    clipped = int(np.count_nonzero(scaled < low) + np.count_nonzero(scaled > high))
    np.clip(scaled, low, high, out=scaled)
    return scaled.astype(dtype), clipped


_BLOCK = 16384
"""Pixels per block of `hu_to_stored` (128 KiB of float64: stays in a core's cache)."""


def _hu_to_stored_values(
    hu: npt.NDArray[np.generic], slope: float, intercept: float
) -> npt.NDArray[np.float64]:
    """round((hu - intercept) / slope), half to even, in float64, in a new array."""
    return _to_stored_in_place(np.array(hu, dtype=np.float64), slope, intercept)


def _to_stored_in_place(
    values: npt.NDArray[np.float64], slope: float, intercept: float
) -> npt.NDArray[np.float64]:
    """`values` (HU, float64) replaced by round((values - intercept) / slope), half to even, and
    returned. The HU were made float64 first, so each operation is the float64 one whatever
    the input's dtype; subtracting 0 and dividing by 1 are exact, so they are skipped."""
    if intercept != 0.0:
        np.subtract(values, intercept, out=values)
    if slope != 1.0:
        np.divide(values, slope, out=values)
    np.rint(values, out=values)
    return values


def write_pixels(ds: Dataset, stored: StoredArray) -> None:
    """Store one frame of stored values as uncompressed Pixel Data in `ds` (in place).

    `stored`: (Rows, Columns) array whose dtype matches Bits Allocated / Pixel Representation
    of `ds` (as returned by `hu_to_stored`). Pixel Data is written little endian (VR OW, or OB
    for 8-bit), padded to even length (PS3.5 8.1.1), and the file meta Transfer Syntax UID is
    set to Explicit VR Little Endian. Bits Allocated / Stored, High Bit, Pixel Representation
    and Rescale Slope / Intercept are left as they are: `stored` was computed for them.
    Smallest / Largest Image Pixel Value (0028,0106/0107) are recomputed if present; the
    series-wide Smallest / Largest Pixel Value in Series are removed (one image cannot know
    them). Window Center / Width are not touched here (the derived-series builder owns them).
    Encapsulation leftovers (Extended Offset Table) are removed.
    """
    rows, cols = int(ds.Rows), int(ds.Columns)
    if stored.shape != (rows, cols):
        raise PixelFormatError(
            f"{_label(ds)}: pixel array shape {stored.shape} does not match Rows x Columns "
            f"({rows}, {cols})"
        )
    expected = storage_dtype(ds)
    if stored.dtype.kind != expected.kind or stored.dtype.itemsize != expected.itemsize:
        raise PixelFormatError(
            f"{_label(ds)}: pixel array dtype {stored.dtype} does not match Bits Allocated "
            f"{ds.BitsAllocated} / Pixel Representation {ds.PixelRepresentation} ({expected})"
        )
    low, high = stored_value_range(ds)
    smallest, largest = int(stored.min()), int(stored.max())
    if stored.size and (smallest < low or largest > high):
        raise PixelFormatError(
            f"{_label(ds)}: stored values exceed the range of Bits Stored {ds.BitsStored}"
        )
    data = np.ascontiguousarray(stored, dtype=expected.newbyteorder("<")).tobytes()
    if len(data) % 2:
        data += b"\x00"
    ds.PixelData = data
    ds["PixelData"].VR = "OB" if int(ds.BitsAllocated) == 8 else "OW"
    for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        if keyword in ds:
            del ds[keyword]
    for keyword in ("SmallestPixelValueInSeries", "LargestPixelValueInSeries"):
        if keyword in ds:
            del ds[keyword]
    value_vr = "SS" if int(ds.PixelRepresentation) == 1 else "US"
    for keyword, tag, value in (
        ("SmallestImagePixelValue", 0x00280106, smallest),
        ("LargestImagePixelValue", 0x00280107, largest),
    ):
        if keyword in ds:
            del ds[keyword]
            fits = -32768 <= value <= 32767 if value_vr == "SS" else 0 <= value <= 65535
            if fits:  # US/SS hold 16 bits; 32-bit extremes are dropped instead
                ds.add_new(tag, value_vr, value)
    if not hasattr(ds, "file_meta"):
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
