"""The validated envelope of a learned engine, and what a series measures against it.

A learned engine is only known to work on inputs like those it was trained and validated on.
Its weights file records that range (`ValidatedEnvelope`): pixel spacing, slice thickness,
matrix, the source kernel names, and the source noise level measured exactly as at inference
(`engine.noise_level.measure_noise_hu`). Before it runs, the node measures the series
(`measure_series`) and asks the envelope for `violations`; each violation is a sentence an
admin or physicist can read, without patient data. What happens outside the envelope (fall back
to another engine, fail the job, or run anyway with a warning) is the route's configuration
(`dicom_node.config`), not the engine's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from engine.interface import FloatVolume, SeriesGeometry
from engine.noise_level import measure_noise_hu

ENVELOPE_FORMAT: Final = "ltdiff-node/envelope/1"
SPACING_TOLERANCE_MM: Final = 0.0005
"""Header round-off allowed at the edges of the spacing and thickness ranges."""


@dataclass(frozen=True)
class Span:
    """A closed interval [low, high] of one measured quantity."""

    low: float
    high: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low <= self.high):
            raise ValueError(f"invalid range [{self.low}, {self.high}]")

    def contains(self, value: float, tolerance: float = 0.0) -> bool:
        return self.low - tolerance <= value <= self.high + tolerance

    def text(self, unit: str = "", digits: int = 3) -> str:
        lo, hi = f"{self.low:.{digits}g}", f"{self.high:.{digits}g}"
        return f"{lo}{unit}" if lo == hi else f"{lo}-{hi}{unit}"

    @classmethod
    def of(cls, values: Sequence[float]) -> Span:
        if not values:
            raise ValueError("a range needs at least one value")
        return cls(float(min(values)), float(max(values)))


@dataclass(frozen=True)
class SeriesMeasurement:
    """What the envelope checks, measured from one series (no patient data).

    pixel_spacing_mm: mean of the row and column spacing. slice_thickness_mm: SliceThickness
    (0018,0050), None when absent. noise_hu: `measure_noise_hu`, None when it could not be
    measured (too little soft tissue). source_kernel: ConvolutionKernel, None when absent.
    """

    pixel_spacing_mm: float
    slice_thickness_mm: float | None
    rows: int
    columns: int
    source_kernel: str | None
    noise_hu: float | None

    def as_log(self) -> dict[str, Any]:
        """Fields for a structured log line."""
        return {
            "pixel_spacing_mm": round(self.pixel_spacing_mm, 4),
            "slice_thickness_mm": self.slice_thickness_mm,
            "matrix": f"{self.rows}x{self.columns}",
            "source_kernel": self.source_kernel,
            "noise_hu": None if self.noise_hu is None else round(self.noise_hu, 2),
        }


def measure_series(
    volume_hu: FloatVolume,
    geometry: SeriesGeometry,
    *,
    slice_thickness_mm: float | None,
    source_kernel: str | None,
) -> SeriesMeasurement:
    """Measure a decoded series [slices, rows, cols] for the envelope check."""
    volume = np.asarray(volume_hu)
    spacing = float(np.mean(geometry.pixel_spacing_mm))
    return SeriesMeasurement(
        pixel_spacing_mm=spacing,
        slice_thickness_mm=slice_thickness_mm,
        rows=int(volume.shape[1]),
        columns=int(volume.shape[2]),
        source_kernel=source_kernel,
        noise_hu=measure_noise_hu(volume, spacing),
    )


@dataclass(frozen=True)
class ValidatedEnvelope:
    """The inputs a weights file was trained and validated on (module docstring)."""

    pixel_spacing_mm: Span
    slice_thickness_mm: Span
    rows: Span
    columns: Span
    source_kernels: tuple[str, ...]
    noise_hu: Span
    validated_on: tuple[str, ...] = ()
    """Subject labels of the data (training and held-out validation), for the model card."""

    def violations(self, m: SeriesMeasurement) -> tuple[str, ...]:
        """Why a series is outside the envelope: one readable sentence per quantity; empty when
        it is inside."""
        out: list[str] = []
        if not self.pixel_spacing_mm.contains(m.pixel_spacing_mm, SPACING_TOLERANCE_MM):
            out.append(
                f"pixel spacing {m.pixel_spacing_mm:.3f} mm is outside the validated "
                f"{self.pixel_spacing_mm.text(' mm')}"
            )
        if m.slice_thickness_mm is None:
            out.append("slice thickness is not stated (SliceThickness absent)")
        elif not self.slice_thickness_mm.contains(m.slice_thickness_mm, SPACING_TOLERANCE_MM):
            out.append(
                f"slice thickness {m.slice_thickness_mm:g} mm is outside the validated "
                f"{self.slice_thickness_mm.text(' mm')}"
            )
        if not (self.rows.contains(m.rows) and self.columns.contains(m.columns)):
            out.append(
                f"matrix {m.rows}x{m.columns} is outside the validated rows "
                f"{self.rows.text()} x columns {self.columns.text()}"
            )
        known = {k.strip().casefold() for k in self.source_kernels}
        if m.source_kernel is None:
            out.append("source kernel is not stated (ConvolutionKernel absent)")
        elif m.source_kernel.strip().casefold() not in known:
            out.append(
                f"source kernel {m.source_kernel.strip()} is not one the weights were "
                f"validated on ({', '.join(self.source_kernels)})"
            )
        if m.noise_hu is None:
            out.append("noise level could not be measured (too little soft tissue)")
        elif not self.noise_hu.contains(m.noise_hu):
            out.append(
                f"noise level {m.noise_hu:.1f} HU is outside the validated "
                f"{self.noise_hu.text(' HU')}"
            )
        return tuple(out)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": ENVELOPE_FORMAT,
                "pixel_spacing_mm": [self.pixel_spacing_mm.low, self.pixel_spacing_mm.high],
                "slice_thickness_mm": [self.slice_thickness_mm.low, self.slice_thickness_mm.high],
                "rows": [self.rows.low, self.rows.high],
                "columns": [self.columns.low, self.columns.high],
                "source_kernels": list(self.source_kernels),
                "noise_hu": [self.noise_hu.low, self.noise_hu.high],
                "validated_on": list(self.validated_on),
            },
            sort_keys=True,
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ValidatedEnvelope:
        """Parse strictly; ValueError says what is wrong."""
        if data.get("format") != ENVELOPE_FORMAT:
            raise ValueError(f"envelope format is {data.get('format')!r}, not {ENVELOPE_FORMAT!r}")

        def span(key: str) -> Span:
            value = data.get(key)
            if not (isinstance(value, list) and len(value) == 2):
                raise ValueError(f"envelope {key} must be [low, high], got {value!r}")
            return Span(float(value[0]), float(value[1]))

        kernels = data.get("source_kernels")
        if not (isinstance(kernels, list) and kernels and all(isinstance(k, str) for k in kernels)):
            raise ValueError(f"envelope source_kernels must be a list of names, got {kernels!r}")
        return cls(
            pixel_spacing_mm=span("pixel_spacing_mm"),
            slice_thickness_mm=span("slice_thickness_mm"),
            rows=span("rows"),
            columns=span("columns"),
            source_kernels=tuple(kernels),
            noise_hu=span("noise_hu"),
            validated_on=tuple(str(s) for s in data.get("validated_on", [])),
        )

    def describe(self) -> str:
        """One line for `check-config` and the model card."""
        return (
            f"pixel {self.pixel_spacing_mm.text(' mm')}, "
            f"slices {self.slice_thickness_mm.text(' mm')}, "
            f"matrix {self.rows.text()}x{self.columns.text()}, kernels "
            f"{', '.join(self.source_kernels)}, noise {self.noise_hu.text(' HU')}"
        )


def engine_envelope(engine: object) -> ValidatedEnvelope | None:
    """The validated envelope of an engine (its `envelope` property), None for engines without
    one (the linear filter: a fitted filter, deterministic, the usual fallback)."""
    envelope = getattr(engine, "envelope", None)
    return envelope if isinstance(envelope, ValidatedEnvelope) else None
