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
    ) -> FloatVolume:
        """Map a source-kernel volume [slices, rows, cols] in HU to a target-kernel-like volume.

        The output has the same shape, dtype float32 and unit (HU). `seed` makes stochastic
        engines reproducible; the node derives it from the series' UIDs. Deterministic engines
        ignore it. `noise_hu`: the series' noise level (`engine.noise_level.measure_noise_hu` of
        this volume and its mean pixel spacing) when the caller has measured it already (the
        envelope check does), so an engine conditioned on it need not measure it again; None:
        the engine measures it if it needs it. Engines that do not use it ignore it.
        """
        ...


class EngineError(RuntimeError):
    """An engine cannot process this input (wrong geometry, incompatible weights, ...)."""
