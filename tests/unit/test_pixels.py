"""Pixel transforms: decoding to HU, HU back to stored values, writing Pixel Data."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from engine.pixels import (
    PixelFormatError,
    dataset_frames_to_hu,
    dataset_to_hu,
    decode_stored,
    hu_to_stored,
    storage_dtype,
    stored_value_range,
    write_pixels,
)
from engine.synthetic import make_ct_dataset


def _testfile(name: str) -> Dataset:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not available")
    return pydicom.dcmread(path)


def _storage(bits_stored: int, pixel_representation: int, intercept: float, slope: float = 1.0):
    ds = Dataset()
    ds.SOPInstanceUID = "1.2.3"
    ds.Rows, ds.Columns = 4, 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = pixel_representation
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.RescaleIntercept, ds.RescaleSlope = intercept, slope
    return ds


def test_hu_round_trip_is_exact_for_unsigned_12bit_storage():
    hu = np.arange(-1024, 3072, dtype=np.float32).reshape(64, 64)
    ds = make_ct_dataset(hu, bits_stored=12, pixel_representation=0, rescale_intercept=-1024)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    np.testing.assert_array_equal(dataset_to_hu(ds), hu)


def test_signed_storage_round_trip():
    hu = np.linspace(-3024, 3071, 64 * 64).round().astype(np.float32).reshape(64, 64)
    ds = make_ct_dataset(hu, bits_stored=16, pixel_representation=1, rescale_intercept=0)
    stored, clipped = hu_to_stored(hu, ds)
    assert clipped == 0
    assert stored.dtype == np.int16
    np.testing.assert_array_equal(dataset_to_hu(ds), hu)


def test_hu_to_stored_clips_and_counts_below_minus_1024():
    ds = _storage(12, 0, -1024.0)
    hu = np.array([[-1500.0, -1024.0, 0.0, 3071.0, 5000.0]])
    stored, clipped = hu_to_stored(hu, ds)
    assert clipped == 2, "one value below -1024 HU and one above 3071 HU must be counted"
    np.testing.assert_array_equal(stored, [[0, 0, 1024, 4095, 4095]])
    assert stored.dtype == np.uint16


def test_hu_to_stored_applies_slope_and_rounds():
    ds = _storage(16, 1, -1000.0, 0.5)
    stored, clipped = hu_to_stored(np.array([-1000.0, -999.7, -999.0, 0.0]), ds)
    np.testing.assert_array_equal(stored, [0, 1, 2, 2000])
    assert clipped == 0


def test_hu_to_stored_rejects_nan():
    with pytest.raises(PixelFormatError, match="NaN"):
        hu_to_stored(np.array([np.nan]), _storage(12, 0, -1024.0))


def test_signed_range_is_twos_complement_of_bits_stored():
    assert stored_value_range(_storage(12, 1, 0.0)) == (-2048, 2047)
    assert stored_value_range(_storage(12, 0, 0.0)) == (0, 4095)


def test_decodes_real_512_ct_in_every_transfer_syntax_to_same_hu():
    reference = dataset_to_hu(_testfile("693_UNCR.dcm"))
    j2k = _testfile("693_J2KR.dcm")
    assert j2k.file_meta.TransferSyntaxUID == JPEG2000Lossless
    np.testing.assert_array_equal(dataset_to_hu(j2k), reference)
    # The lossy pair: the uncompressed file holds the decoded lossy image, so they match too.
    np.testing.assert_allclose(
        dataset_to_hu(_testfile("693_J2KI.dcm")), dataset_to_hu(_testfile("693_UNCI.dcm")), atol=1
    )
    assert reference.dtype == np.float32
    assert reference.shape == (512, 512)


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
    ],
)
def test_lossless_transfer_syntaxes_decode_to_the_uncompressed_values(name):
    np.testing.assert_array_equal(
        dataset_to_hu(_testfile(name)), dataset_to_hu(_testfile("MR_small.dcm"))
    )


def test_jpeg_lossless_and_deflate_decode():
    assert dataset_to_hu(_testfile("bad_sequence.dcm")).shape == (512, 512)
    assert dataset_to_hu(_testfile("image_dfl.dcm")).shape == (512, 512)


def test_multi_frame_decodes_to_frames_rows_cols():
    frames = dataset_frames_to_hu(_testfile("eCT_Supplemental.dcm"))
    assert frames.shape == (2, 512, 512)
    assert frames.dtype == np.float32
    assert frames.min() >= -1024.0, "per-frame intercept -1024 applies to unsigned storage"
    with pytest.raises(PixelFormatError, match="frames"):
        dataset_to_hu(_testfile("eCT_Supplemental.dcm"))


def test_color_image_rejected_with_clear_error():
    with pytest.raises(PixelFormatError, match=r"colour.*RGB.*MONOCHROME2"):
        dataset_to_hu(_testfile("SC_rgb.dcm"))


def test_missing_pixel_data_rejected():
    ds = make_ct_dataset(rows=8, cols=8)
    del ds.PixelData
    with pytest.raises(PixelFormatError, match="no Pixel Data"):
        dataset_to_hu(ds)


def test_one_bit_and_float_pixel_data_rejected():
    ds = make_ct_dataset(rows=8, cols=8)
    ds.BitsAllocated = 1
    with pytest.raises(PixelFormatError, match="Bits Allocated 1"):
        dataset_to_hu(ds)
    ds = make_ct_dataset(rows=8, cols=8)
    del ds.PixelData
    ds.FloatPixelData = b"\x00" * 256
    with pytest.raises(PixelFormatError, match="float pixel data"):
        dataset_to_hu(ds)


def test_missing_decoder_names_the_transfer_syntax():
    ds = make_ct_dataset(rows=8, cols=8)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder exists
    with pytest.raises(PixelFormatError, match=r"1\.2\.840\.10008\.1\.2\.4\.100"):
        dataset_to_hu(ds)


def test_write_pixels_makes_uncompressed_and_updates_extremes():
    ds = _testfile("693_J2KR.dcm")
    hu = dataset_to_hu(ds)
    ds.SmallestImagePixelValue = 0
    ds.LargestImagePixelValue = 1
    stored, clipped = hu_to_stored(hu + 10.0, ds)
    write_pixels(ds, stored)
    assert clipped == 0
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert len(ds.PixelData) == 512 * 512 * 2
    assert ds.SmallestImagePixelValue == int(stored.min())
    assert ds.LargestImagePixelValue == int(stored.max())
    np.testing.assert_array_equal(dataset_to_hu(ds), hu + 10.0)


def test_write_pixels_rejects_wrong_shape_and_dtype():
    ds = make_ct_dataset(rows=8, cols=8)
    with pytest.raises(PixelFormatError, match="shape"):
        write_pixels(ds, np.zeros((4, 4), dtype=np.uint16))
    with pytest.raises(PixelFormatError, match="dtype"):
        write_pixels(ds, np.zeros((8, 8), dtype=np.int32))


def _reference_hu_to_stored(hu: np.ndarray, ds: Dataset) -> tuple[np.ndarray, int]:
    """hu_to_stored as it was before the block-wise version: one float64 array, whole."""
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    scaled = np.rint((np.array(hu, dtype=np.float64) - intercept) / slope)
    low, high = (
        (-(2 ** (int(ds.BitsStored) - 1)), 2 ** (int(ds.BitsStored) - 1) - 1)
        if int(ds.PixelRepresentation)
        else (0, 2 ** int(ds.BitsStored) - 1)
    )
    clipped = int(np.count_nonzero(scaled < low) + np.count_nonzero(scaled > high))
    return np.clip(scaled, low, high).astype(storage_dtype(ds)), clipped


@pytest.mark.parametrize(
    ("bits", "signed", "intercept", "slope", "dtype", "spread"),
    [
        (12, 0, -1024.0, 1.0, np.float32, 400.0),  # no clipping: block-wise path
        (12, 0, -1024.0, 1.0, np.float32, 3000.0),  # clipping below and above
        (16, 1, 0.0, 1.0, np.float64, 400.0),
        (16, 1, -1000.5, 0.25, np.float32, 2000.0),
        (16, 0, 10.0, -0.5, np.float64, 2000.0),  # negative slope: extremes swap
    ],
)
def test_hu_to_stored_matches_the_whole_array_reference(
    bits: int, signed: int, intercept: float, slope: float, dtype: type, spread: float
):
    """The monotonic-extremes shortcut and the block-wise transform change no stored value and
    no clip count, ties (x.5) included."""
    ds = _storage(bits, signed, intercept, slope)
    rng = np.random.default_rng(bits + signed)
    hu = rng.normal(0.0, spread, (300, 97)).astype(dtype)
    hu[0, :8] = np.arange(8) + 0.5  # ties, half to even
    expected, expected_clipped = _reference_hu_to_stored(hu, ds)
    stored, clipped = hu_to_stored(hu, ds)
    assert stored.dtype == expected.dtype
    np.testing.assert_array_equal(stored, expected)
    assert clipped == expected_clipped


def _native(bits_allocated: int, bits_stored: int, signed: int, shape: tuple[int, int, int]):
    """A native (uncompressed) dataset whose unused high bits hold garbage."""
    frames, rows, cols = shape
    ds = _storage(bits_stored, signed, -1024.0)
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = bits_allocated
    if frames > 1:
        ds.NumberOfFrames = frames
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits_allocated // 8}")
    raw = np.random.default_rng(bits_stored).integers(
        np.iinfo(dtype).min, np.iinfo(dtype).max, size=shape, dtype=dtype, endpoint=True
    )
    data = raw.tobytes()
    ds.PixelData = data + b"\0" * (len(data) % 2)
    ds["PixelData"].VR = "OB" if bits_allocated == 8 else "OW"
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


@pytest.mark.parametrize(
    ("bits_allocated", "bits_stored", "signed", "shape"),
    [
        (16, 12, 0, (1, 5, 7)),  # unused bits masked
        (16, 12, 1, (1, 5, 7)),  # sign-extended from bit 11
        (16, 16, 1, (3, 4, 4)),  # multi-frame
        (8, 8, 0, (1, 3, 3)),  # odd length, padded
        (32, 20, 1, (1, 4, 4)),
    ],
)
def test_native_pixel_data_decode_as_pydicom_does(bits_allocated, bits_stored, signed, shape):
    """The frombuffer path for uncompressed data gives pydicom's pixel_array, unused bits and
    all, and the HU conversion equals the float64 one."""
    from pydicom.pixels.utils import pixel_array

    ds = _native(bits_allocated, bits_stored, signed, shape)
    expected = pixel_array(ds, as_rgb=False).reshape(shape)
    stored = decode_stored(ds)
    assert stored.dtype == expected.dtype
    np.testing.assert_array_equal(stored, expected)
    assert stored.flags.writeable
    for slope, intercept in ((1.0, -1024.0), (0.5, -1000.25), (1.0, 0.0)):
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        reference = (expected.astype(np.float64) * slope + intercept).astype(np.float32)
        np.testing.assert_array_equal(dataset_frames_to_hu(ds), reference)


def test_native_pixel_data_of_the_wrong_length_still_fails_as_before():
    ds = _native(16, 12, 0, (1, 5, 7))
    ds.PixelData = ds.PixelData[:-4]
    with pytest.raises(PixelFormatError, match="less than expected"):
        decode_stored(ds)
