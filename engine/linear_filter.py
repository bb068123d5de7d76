"""Classical kernel conversion: a fitted, radially symmetric, zero-phase frequency-domain filter.

Two reconstructions of one sinogram with different FBP kernels differ, where the source kernel
still carries signal, by a linear shift-invariant filter: the ratio of the two kernels' MTFs. The
filter is fitted from paired slices as a Wiener / least-squares transfer function

    G(f) = Re<S_AB(f)> / (<S_AA(f)> + lambda(f))

with A the source-kernel image, B the target-kernel image, S the cross- and auto-spectra averaged
over slices and over rings of equal radial spatial frequency f, and lambda a regularization term
tied to the source's noise floor (see `training.fit_linear`). Because f is in line pairs per mm,
the same gain curve applies to any pixel spacing or field of view: the engine evaluates G at the
physical frequencies of each image's FFT grid.

Behaviour worth knowing:

* The gain is tabulated on `frequency_lp_per_mm` (starting at 0, increasing) and linearly
  interpolated. G(0) is 1 by construction of the fit (both kernels are water-calibrated), so
  the mean CT number of large uniform regions is preserved, and adding a constant to the input
  adds the same constant to the output: filtering HU or HU + 1000 gives the same result.
* Above the highest tabulated frequency (a finer pixel spacing than in training) the source
  kernel carries no signal the fit has seen, so the gain rolls off from its last value to 0 with a
  cos^2 taper over `ROLLOFF_WIDTH_LP_PER_MM`.
* Slices are filtered independently in 2-D, padded by mirror reflection so the FFT's periodic
  wrap-around does not bleed the opposite border into the image. Rows and columns may differ in
  number and spacing.
* The FFTs run in torch when it can be imported (two slices per complex FFT, several times
  faster than numpy's, and multithreaded), else in numpy; the two agree to float32 round-off
  (tests/unit/test_linear_filter.py).
* The output is float32 HU and is not clipped: the storage step clips to the representable range
  (e.g. -1024 HU for Siemens-like unsigned storage) when the derived series is written.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
from safetensors.numpy import load as _safetensors_load
from safetensors.numpy import save as _safetensors_save

from engine import __version__
from engine.interface import (
    EngineError,
    EngineIdentity,
    FloatVolume,
    SeriesGeometry,
    check_output_buffer,
)

ENGINE_KIND: Final = "linear-filter"
FORMAT_NAME: Final = "ltdiff-node/linear-filter"
FORMAT_VERSION: Final = "1"
SHIPPED_WEIGHTS: Final = {"br40d-bl64d": "linear-br40d-bl64d.safetensors"}
"""Shipped fitted filters, by kernel pair, as file names in the `engine/weights` data folder."""

ROLLOFF_WIDTH_LP_PER_MM: Final = 0.1
"""Width of the cos^2 taper from the last fitted gain to 0 above the fitted frequency range."""

PAD_PX: Final = 32
"""Mirror padding on each side of a slice; the fitted filters' impulse responses are far shorter."""

CHUNK_SLICES: Final = 16
"""Slices filtered per FFT batch: bounds the working memory to ~50 MB for 512 x 512 slices."""

_REQUIRED_METADATA: Final = (
    "format",
    "format_version",
    "engine_kind",
    "source_kernel",
    "target_kernel",
    "fit_settings",
    "training_data",
    "code_version",
    "created",
)
_TENSORS: Final = ("frequency_lp_per_mm", "gain", "coherence", "counts")

Float64Array = npt.NDArray[np.float64]


@dataclass(frozen=True)
class LinearFilter:
    """A radial gain curve G(f) and what it was fitted for.

    frequency_lp_per_mm: float64 [n], increasing, first value 0.
    gain: float64 [n], G at those frequencies (dimensionless, HU out per HU in).
    coherence: float64 [n], magnitude-squared coherence of source and target per bin, 0..1: the
        fraction of the target's power a linear filter of the source can explain.
    counts: int64 [n], number of Fourier samples that went into each bin (0 for the f = 0 anchor).
    source_kernel / target_kernel: kernel names, e.g. "Br40d" / "Bl64d".
    fit_settings / training_data: JSON-serializable descriptions stored in the weights file.
    """

    frequency_lp_per_mm: Float64Array
    gain: Float64Array
    coherence: Float64Array
    counts: npt.NDArray[np.int64]
    source_kernel: str
    target_kernel: str
    fit_settings: Mapping[str, object] = field(default_factory=dict)
    training_data: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_curve(
            self.frequency_lp_per_mm, self.gain, self.coherence, self.counts, where="LinearFilter"
        )

    def gain_at(self, frequency_lp_per_mm: npt.ArrayLike) -> Float64Array:
        """G at any radial frequencies (lp/mm), with the documented rolloff above the range."""
        f = np.asarray(frequency_lp_per_mm, dtype=np.float64)
        freq, gain = self.frequency_lp_per_mm, self.gain
        g = np.interp(f, freq, gain)
        f_max = float(freq[-1])
        above = f > f_max
        if np.any(above):
            t = np.clip((f[above] - f_max) / ROLLOFF_WIDTH_LP_PER_MM, 0.0, 1.0)
            g[above] = np.where(t < 1.0, gain[-1] * np.cos(0.5 * np.pi * t) ** 2, 0.0)
        return g


def _check_curve(
    freq: npt.NDArray[np.generic],
    gain: npt.NDArray[np.generic],
    coherence: npt.NDArray[np.generic],
    counts: npt.NDArray[np.generic],
    *,
    where: str,
) -> None:
    n = freq.shape[0] if freq.ndim == 1 else -1
    for name, arr in zip(_TENSORS, (freq, gain, coherence, counts), strict=True):
        if arr.ndim != 1 or arr.shape[0] != n:
            raise EngineError(
                f"{where}: tensor {name!r} has shape {arr.shape}, expected ({n},) like "
                f"'frequency_lp_per_mm'"
            )
    if n < 2:
        raise EngineError(f"{where}: the gain curve needs at least 2 frequencies, got {n}")
    if not (np.all(np.isfinite(freq)) and np.all(np.isfinite(gain))):
        raise EngineError(f"{where}: frequencies and gains must be finite")
    if freq[0] != 0.0 or not np.all(np.diff(freq) > 0):
        raise EngineError(
            f"{where}: 'frequency_lp_per_mm' must start at 0 and increase strictly, "
            f"got {freq[:3].tolist()}..."
        )


class LinearFilterEngine:
    """Kernel standardization by a fitted radial frequency-domain filter (see module docstring).

    Stateless between calls and deterministic; `seed` is ignored. `fft`: which library computes
    the FFTs (`resolve_fft_backend`); both give the same result to float32 round-off.
    """

    def __init__(
        self, linear_filter: LinearFilter, *, weights_sha256: str, fft: FftBackend = "auto"
    ) -> None:
        self._filter = linear_filter
        self._fft = resolve_fft_backend(fft)
        self._identity = EngineIdentity(
            name=ENGINE_KIND,
            version=__version__,
            weights_sha256=weights_sha256,
            source_kernel=linear_filter.source_kernel,
            target_kernel=linear_filter.target_kernel,
        )

    @classmethod
    def from_file(cls, path: Path, *, fft: FftBackend = "auto") -> LinearFilterEngine:
        """Load a weights file written by `save_linear_filter`, strictly (`parse_linear_filter`)."""
        data = Path(path).read_bytes()
        linear_filter = parse_linear_filter(data, source=str(path))
        return cls(linear_filter, weights_sha256=hashlib.sha256(data).hexdigest(), fft=fft)

    @property
    def identity(self) -> EngineIdentity:
        return self._identity

    @property
    def linear_filter(self) -> LinearFilter:
        return self._filter

    def transfer_function(
        self, shape: tuple[int, int], pixel_spacing_mm: tuple[float, float]
    ) -> npt.NDArray[np.float32]:
        """G on the rfft2 grid of an image of `shape` (rows, cols) with (row, col) spacing in mm."""
        rows, cols = shape
        row_mm, col_mm = pixel_spacing_mm
        fy = np.fft.fftfreq(rows, d=row_mm)
        fx = np.fft.rfftfreq(cols, d=col_mm)
        radius = np.hypot(fy[:, None], fx[None, :])
        return self._filter.gain_at(radius).astype(np.float32)

    def standardize(
        self,
        volume_hu: FloatVolume,
        geometry: SeriesGeometry,
        *,
        seed: int = 0,
        noise_hu: float | None = None,
        out: FloatVolume | None = None,
    ) -> FloatVolume:
        """Filter each slice of a [slices, rows, cols] HU volume; float32 HU out, same shape.

        `seed` and `noise_hu` are ignored: the filter is deterministic and the same at every
        noise level. `out` may be `volume_hu` itself (each chunk of slices is copied into the
        FFT buffer before its output is written).
        """
        del seed, noise_hu
        volume = np.asarray(volume_hu)
        if volume.ndim != 3 or min(volume.shape[1:]) < 2:
            raise EngineError(
                f"expected a volume [slices, rows, cols] with at least 2 x 2 pixels per slice, "
                f"got shape {volume.shape}"
            )
        check_output_buffer(volume, out)
        row_mm, col_mm = (float(s) for s in geometry.pixel_spacing_mm)
        if not (math.isfinite(row_mm) and math.isfinite(col_mm) and row_mm > 0 and col_mm > 0):
            raise EngineError(f"pixel spacing must be positive, got {geometry.pixel_spacing_mm}")
        if not np.all(np.isfinite(volume)):
            raise EngineError("the input volume contains NaN or infinite values")

        n_slices, rows, cols = volume.shape
        padding = MirrorPadding.around(rows, cols)
        gain = self.transfer_function(padding.padded_shape, (row_mm, col_mm))
        filter_into = _gain_filter(gain, padding, self._fft)
        output = np.empty(volume.shape, dtype=np.float32) if out is None else out
        for start in range(0, n_slices, CHUNK_SLICES):
            chunk = volume[start : start + CHUNK_SLICES].astype(np.float32, copy=False)
            filter_into(chunk, output[start : start + CHUNK_SLICES])
        return output


@dataclass(frozen=True)
class MirrorPadding:
    """Where a slice sits in its FFT frame, and which slice pixel each border pixel mirrors
    (numpy's "symmetric" padding: the edge pixel repeated, then the image reflected).

    before: (rows, cols) of padding above and left of the slice.
    padded_shape: the FFT frame, a fast FFT size in each dimension.
    row_source / col_source: for each frame row (column), the slice row (column) it shows.
    """

    rows: int
    cols: int
    before: tuple[int, int]
    padded_shape: tuple[int, int]
    row_source: npt.NDArray[np.intp] = field(repr=False)
    col_source: npt.NDArray[np.intp] = field(repr=False)

    @classmethod
    def around(cls, rows: int, cols: int) -> MirrorPadding:
        r0, c0 = min(PAD_PX, rows - 1), min(PAD_PX, cols - 1)
        frame = (_good_fft_size(rows + 2 * r0), _good_fft_size(cols + 2 * c0))
        row_source = np.pad(np.arange(rows), (r0, frame[0] - rows - r0), mode="symmetric")
        col_source = np.pad(np.arange(cols), (c0, frame[1] - cols - c0), mode="symmetric")
        return cls(rows, cols, (r0, c0), frame, row_source, col_source)

    @property
    def inside(self) -> tuple[slice, slice]:
        """The slice's own pixels within the frame."""
        r0, c0 = self.before
        return slice(r0, r0 + self.rows), slice(c0, c0 + self.cols)

    def pad(self, stack: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """A new [n, frame rows, frame cols] array: each slice of `stack`, mirror-padded."""
        (r0, c0), (fr, fc) = self.before, self.padded_shape
        return np.pad(
            stack, ((0, 0), (r0, fr - self.rows - r0), (c0, fc - self.cols - c0)), "symmetric"
        )

    def fill_border(self, frames: npt.NDArray[Any]) -> None:
        """Mirror the slice pixels of `frames` [n, frame rows, frame cols] (already in place at
        `inside`) into the frame's border, in place; the same as `pad` for any dtype."""
        rows, cols = self.inside
        r0, c0 = self.before
        top, bottom = slice(0, r0), slice(rows.stop, None)
        frames[:, top, cols] = frames[:, r0 + self.row_source[top], cols]
        frames[:, bottom, cols] = frames[:, r0 + self.row_source[bottom], cols]
        left, right = slice(0, c0), slice(cols.stop, None)
        frames[:, :, left] = frames[:, :, c0 + self.col_source[left]]
        frames[:, :, right] = frames[:, :, c0 + self.col_source[right]]


FftBackend = Literal["auto", "torch", "numpy"]
FFT_BACKENDS: Final = ("auto", "torch", "numpy")


def _torch_or_none() -> ModuleType | None:
    try:
        import torch  # noqa: PLC0415 (optional speed-up; numpy computes the same filter)
    except ImportError:
        return None
    return torch


def resolve_fft_backend(backend: FftBackend) -> Literal["torch", "numpy"]:
    """The FFT library the filter will use: "auto" is torch when it can be imported (about
    3x faster than numpy's pocketfft on one thread for 576 x 576 float32, and it uses the
    process's torch threads), else numpy."""
    if backend not in FFT_BACKENDS:
        raise EngineError(f"FFT backend must be one of {FFT_BACKENDS}, got {backend!r}")
    if backend == "numpy":
        return "numpy"
    if _torch_or_none() is None:
        if backend == "torch":
            raise EngineError("FFT backend 'torch' asked for, but torch cannot be imported")
        return "numpy"
    return "torch"


def _torch_gain_filter(
    gain: npt.NDArray[np.float32], padding: MirrorPadding
) -> Callable[[npt.NDArray[np.float32], npt.NDArray[np.float32]], None]:
    """`_gain_filter` in torch, two slices per complex FFT.

    G is real and even (it depends on |f| only, and the FFT grid's frequencies at k and n - k are
    exact negatives), so for real slices a and b, ifft2(G fft2(a + ib)) = (G * a) + i (G * b):
    one complex transform pair filters two slices. In torch that costs less than half of
    rfft2 + irfft2 per slice (whose complex-to-real 2-D transform is the slow part).
    The slices go straight into the complex buffer's real and imaginary planes and are mirror-
    padded there (both planes at once), and the output is cropped straight out of it: no padded
    or filtered copy of a chunk is made.
    """
    torch = _torch_or_none()
    if torch is None:  # resolve_fft_backend chose torch, so it imported then
        raise EngineError("torch cannot be imported")
    rows, cols = padding.padded_shape
    full = np.empty((rows, cols), dtype=np.float32)
    half = gain.shape[1]
    full[:, :half] = gain
    # Columns above cols // 2 are the negative frequencies: G(fy, -fx) = G(-fy, fx) by evenness.
    negative = np.arange(half, cols)
    full[:, half:] = gain[(-np.arange(rows)) % rows][:, cols - negative]
    gain_t = torch.from_numpy(full).to(torch.complex64)
    inside = (slice(None), *padding.inside)

    # One set of buffers for the whole volume (every chunk but the last has the same size or
    # less): allocating them per chunk leaves the freed memory with the allocator, not the system.
    buffers: list[tuple[npt.NDArray[np.complex64], Any, Any]] = []

    def filter_pairs(stack: npt.NDArray[np.float32], out: npt.NDArray[np.float32]) -> None:
        n = stack.shape[0]
        m = (n + 1) // 2
        if not buffers or buffers[0][0].shape[0] < m:
            buffers.clear()
            whole = np.empty((m, rows, cols), dtype=np.complex64)
            whole_t = torch.from_numpy(whole)
            buffers.append((whole, whole_t, torch.empty_like(whole_t)))
        whole, whole_t, whole_spectrum = buffers[0]
        pairs, pairs_t, spectrum = whole[:m], whole_t[:m], whole_spectrum[:m]
        pairs.real[inside] = stack[0::2]
        pairs.imag[: n // 2][inside] = stack[1::2]
        if n % 2:
            pairs.imag[n // 2 :][inside] = 0.0  # an odd slice out pairs with zeros
        padding.fill_border(pairs)
        with torch.inference_mode():
            torch.fft.fft2(pairs_t, out=spectrum)
            spectrum *= gain_t
            torch.fft.ifft2(spectrum, out=pairs_t)  # the filtered pairs, back in `pairs`
        out[0::2] = pairs.real[inside]
        out[1::2] = pairs.imag[: n // 2][inside]

    return filter_pairs


def _gain_filter(
    gain: npt.NDArray[np.float32],
    padding: MirrorPadding,
    backend: Literal["torch", "numpy"],
) -> Callable[[npt.NDArray[np.float32], npt.NDArray[np.float32]], None]:
    """A function `(stack, out)` that mirror-pads each slice of a float32 [n, rows, cols] stack,
    multiplies its 2-D spectrum by `gain` (on the rfft2 grid of the padded frame) and writes the
    real result, cropped back to [n, rows, cols], into `out` (float32, may be `stack` itself)."""
    if backend == "torch":
        return _torch_gain_filter(gain, padding)
    inside = (slice(None), *padding.inside)

    def with_numpy(stack: npt.NDArray[np.float32], out: npt.NDArray[np.float32]) -> None:
        spectrum = np.fft.rfft2(padding.pad(stack))
        spectrum *= gain
        out[...] = np.fft.irfft2(spectrum, s=padding.padded_shape)[inside]

    return with_numpy


def _good_fft_size(n: int) -> int:
    """Smallest m >= n whose prime factors are 2, 3 and 5 (fast for pocketfft)."""
    m = n
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


def save_linear_filter(
    path: Path, linear_filter: LinearFilter, *, created: str | None = None
) -> str:
    """Write a self-describing safetensors weights file; returns its SHA-256 (hex).

    created: ISO 8601 timestamp to record; defaults to now (UTC).
    """
    tensors: dict[str, npt.NDArray[np.generic]] = {
        "frequency_lp_per_mm": np.ascontiguousarray(linear_filter.frequency_lp_per_mm, np.float32),
        "gain": np.ascontiguousarray(linear_filter.gain, np.float32),
        "coherence": np.ascontiguousarray(linear_filter.coherence, np.float32),
        "counts": np.ascontiguousarray(linear_filter.counts, np.int64),
    }
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "engine_kind": ENGINE_KIND,
        "source_kernel": linear_filter.source_kernel,
        "target_kernel": linear_filter.target_kernel,
        "fit_settings": json.dumps(dict(linear_filter.fit_settings), sort_keys=True),
        "training_data": json.dumps(dict(linear_filter.training_data), sort_keys=True),
        "code_version": __version__,
        "created": created or datetime.now(UTC).isoformat(timespec="seconds"),
    }
    data = _safetensors_save(tensors, metadata=metadata)
    Path(path).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def load_linear_filter(path: Path) -> LinearFilter:
    """Read a weights file strictly; raise EngineError saying what differs from the format."""
    return parse_linear_filter(Path(path).read_bytes(), source=str(path))


def read_weights_metadata(data: bytes, *, source: str) -> dict[str, str]:
    """The string metadata of a safetensors file, read from its JSON header without the tensors."""
    if len(data) < 8:
        raise EngineError(f"{source}: not a safetensors file (only {len(data)} bytes)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise EngineError(f"{source}: not a safetensors file (header length {header_len})")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EngineError(f"{source}: not a safetensors file (header is not JSON)") from exc
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise EngineError(f"{source}: the safetensors file has no metadata; not a {FORMAT_NAME}")
    return {str(k): str(v) for k, v in metadata.items()}


def parse_linear_filter(data: bytes, *, source: str) -> LinearFilter:
    """Parse a weights file strictly: format, version, kind, tensor names and shapes."""
    metadata = read_weights_metadata(data, source=source)
    missing = [key for key in _REQUIRED_METADATA if key not in metadata]
    if missing:
        raise EngineError(f"{source}: metadata lacks {missing}; not a {FORMAT_NAME} file")
    expected = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "engine_kind": ENGINE_KIND,
    }
    for key, want in expected.items():
        if metadata[key] != want:
            raise EngineError(f"{source}: metadata {key} is {metadata[key]!r}, expected {want!r}")
    try:
        tensors = _safetensors_load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError and ValueError types
        raise EngineError(f"{source}: unreadable safetensors tensors: {exc}") from exc
    names = sorted(tensors)
    if names != sorted(_TENSORS):
        raise EngineError(f"{source}: tensors are {names}, expected {sorted(_TENSORS)}")
    try:
        fit_settings = json.loads(metadata["fit_settings"])
        training_data = json.loads(metadata["training_data"])
    except json.JSONDecodeError as exc:
        raise EngineError(f"{source}: fit_settings/training_data metadata is not JSON") from exc
    freq = tensors["frequency_lp_per_mm"].astype(np.float64)
    gain = tensors["gain"].astype(np.float64)
    coherence = tensors["coherence"].astype(np.float64)
    counts = tensors["counts"]
    if counts.dtype != np.int64:
        raise EngineError(f"{source}: tensor 'counts' has dtype {counts.dtype}, expected int64")
    _check_curve(freq, gain, coherence, counts, where=source)
    return LinearFilter(
        frequency_lp_per_mm=freq,
        gain=gain,
        coherence=coherence,
        counts=counts.astype(np.int64),
        source_kernel=metadata["source_kernel"],
        target_kernel=metadata["target_kernel"],
        fit_settings=fit_settings,
        training_data=training_data,
    )


def shipped_weights_path(pair: str = "br40d-bl64d") -> Path:
    """Path of a shipped fitted filter in the installed `engine/weights` data folder."""
    if pair not in SHIPPED_WEIGHTS:
        raise EngineError(
            f"no shipped linear filter for kernel pair {pair!r}; known: {sorted(SHIPPED_WEIGHTS)}"
        )
    resource = resources.files("engine") / "weights" / SHIPPED_WEIGHTS[pair]
    path = Path(str(resource))
    if not path.is_file():
        raise EngineError(f"shipped weights file {path} is missing from the installation")
    return path
