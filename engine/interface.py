"""The contract between the node and any kernel-standardization engine.

The node hands an engine a whole series as a float32 volume in Hounsfield units and gets back a
volume of the same shape, also in HU. Everything DICOM (decoding, storage representation, headers)
stays outside the engine, so engines are pure array-in, array-out objects that can be tested
without files or sockets, and the node does not care which engine it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

FloatVolume = npt.NDArray[np.float32]


@dataclass(frozen=True)
class SeriesGeometry:
    """Sampling of a series volume, as read from the DICOM headers.

    pixel_spacing_mm: (row spacing, column spacing) in mm, from PixelSpacing (0028,0030).
    slice_positions_mm: position of each slice along the slice normal in mm, in volume order.
    """

    pixel_spacing_mm: tuple[float, float]
    slice_positions_mm: tuple[float, ...]


@dataclass(frozen=True)
class EngineIdentity:
    """Who made a derived series: written into its headers and logs.

    name: engine kind, e.g. "linear-filter" or "ltdiff++".
    version: software version of the code that ran it.
    weights_sha256: hex SHA-256 of the weights file (the fitted filter or the network weights).
    source_kernel / target_kernel: the kernel pair the weights were fitted for, e.g. "Br40d" and
        "Bl64d".
    settings: run-time settings that change the output for the same weights, e.g. "ddim8 eta0"
        for a sampler; empty for an engine that has none. Part of the derived series' UID, so a
        site that changes them gets a new derived series instead of silently replaced pixels.
    """

    name: str
    version: str
    weights_sha256: str
    source_kernel: str
    target_kernel: str
    settings: str = ""

    @property
    def short(self) -> str:
        """A compact, human-readable identity for headers: name, version, weights hash prefix
        and the run-time settings, if any."""
        text = f"{self.name} {self.version} w:{self.weights_sha256[:12]}"
        return f"{text} {self.settings}" if self.settings else text


@runtime_checkable
class Engine(Protocol):
    """A kernel-standardization engine.

    Implementations must be safe to call from one worker thread at a time (the node serializes
    work per device) and must not keep per-series state between calls.
    """

    @property
    def identity(self) -> EngineIdentity: ...

    def standardize(
        self,
        volume_hu: FloatVolume,
        geometry: SeriesGeometry,
        *,
        seed: int = 0,
        noise_hu: float | None = None,
        out: FloatVolume | None = None,
    ) -> FloatVolume:
        """Map a source-kernel volume [slices, rows, cols] in HU to a target-kernel-like volume.

        The output has the same shape, dtype float32 and unit (HU). `seed` makes stochastic
        engines reproducible; the node derives it from the series' UIDs. Deterministic engines
        ignore it. `noise_hu`: the series' noise level (`engine.noise_level.measure_noise_hu` of
        this volume and its mean pixel spacing) when the caller has measured it already (the
        envelope check does), so an engine conditioned on it need not measure it again; None:
        the engine measures it if it needs it. Engines that do not use it ignore it.
        `out`: a float32 array of the input's shape that receives the output and is returned
        (`deliver`); it may be `volume_hu` itself when the caller no longer needs the input
        (the node's pipeline does that: a second volume would cost as much memory again, and
        its first touch time). None: the engine allocates the output.
        """
        ...


class EngineError(RuntimeError):
    """An engine cannot process this input (wrong geometry, incompatible weights, ...)."""


def check_output_buffer(volume: npt.NDArray[np.generic], out: FloatVolume | None) -> None:
    """Raise EngineError unless `out` is None or a writeable float32 array of `volume`'s shape
    that is either `volume` itself or lies outside its memory bounds (an engine writes chunk k
    of the output only after reading chunk k of the input, which a partial overlap would
    break)."""
    if out is None:
        return
    if out.shape != volume.shape or out.dtype != np.float32 or not out.flags.writeable:
        raise EngineError(
            f"output buffer must be writeable float32 of shape {volume.shape}, got "
            f"{out.dtype} {out.shape}"
        )
    same = (
        out.__array_interface__["data"][0] == volume.__array_interface__["data"][0]
        and out.strides == volume.strides
        and out.dtype == volume.dtype
    )
    if not same and np.may_share_memory(out, volume):  # bounds only: never slow
        raise EngineError("output buffer partly overlaps the input volume")


def deliver(result: FloatVolume, out: FloatVolume | None) -> FloatVolume:
    """`result` as an engine returns it: copied into `out` when the caller gave one."""
    if out is None or out is result:
        return result
    out[...] = result
    return out
