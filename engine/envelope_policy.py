"""What runs when a series is outside an engine's validated envelope: the decision, in pure code.

The node's engine process and the offline `ltdiff-node standardize` both call `choose_engine`
(through `engine.pipeline.standardize_series`), so a series gets the same treatment either way.
Given the configured engine, a way to measure the series and the route's policy:

- the engine has no validated envelope (the linear filter): it runs, status "none", nothing is
  measured;
- the series is inside the envelope: the engine runs, status "inside";
- outside, action "fallback": the fallback engine runs instead, status "fallback". A fallback
  that has an envelope of its own which the series also violates is not run, and there is no
  second fallback: `OutsideEnvelopeError`;
- outside, action "fail": `OutsideEnvelopeError`, whose message names the engine and every
  violation (the job fails with it as its reason);
- outside, action "process": the engine runs anyway, status "outside-processed" (the node logs
  a warning and the derived series says so).

`EnvelopeCheck` records what was decided: for the Derivation Description (`derivation_note`) and
for the logs (`as_log`: measurements and sentences, never patient data).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Final

from pydicom.multival import MultiValue

from engine.envelope import SeriesMeasurement, engine_envelope, measure_series
from engine.interface import Engine, EngineError, EngineIdentity
from engine.series_io import LoadedSeries, frame_header


class OutsideEnvelope(StrEnum):
    """A route's action for a series outside its engine's validated envelope."""

    FALLBACK = "fallback"  # run the fallback engine instead (default: the linear filter)
    FAIL = "fail"  # fail the job with a readable reason
    PROCESS = "process"  # run the engine anyway, with a warning


class EnvelopeStatus(StrEnum):
    """What the envelope check found and what ran (the `envelope` field of the logs)."""

    NONE = "none"  # the engine has no validated envelope; it ran
    INSIDE = "inside"  # inside the envelope; the engine ran
    FALLBACK = "fallback"  # outside; the fallback engine ran
    OUTSIDE_PROCESSED = "outside-processed"  # outside; the engine ran anyway
    OUTSIDE_FAILED = "outside-failed"  # outside; nothing ran, the job fails


OUTSIDE_STATUSES: Final = frozenset(
    {EnvelopeStatus.FALLBACK, EnvelopeStatus.OUTSIDE_PROCESSED, EnvelopeStatus.OUTSIDE_FAILED}
)
"""Statuses for which the node logs `engine.outside_envelope`."""


@dataclass(frozen=True)
class EnvelopePolicy:
    """A route's policy: its action outside the envelope and how to get its fallback engine.

    fallback: called only when the fallback is needed (so a caller may load it lazily); None
    with action "fallback" is a programming error (the node and the CLI always give one).
    """

    action: OutsideEnvelope = OutsideEnvelope.FALLBACK
    fallback: Callable[[], Engine] | None = None


@dataclass(frozen=True)
class EnvelopeCheck:
    """The outcome of `choose_engine`.

    status: see EnvelopeStatus. action: the route's configured action (also when inside).
    checked: the configured engine, whose envelope was checked. ran: the engine that ran (the
    fallback for status "fallback"; the configured engine otherwise). measurement: the series'
    measurement, None when the engine has no envelope. violations: the configured engine's
    envelope violations (empty when inside). fallback_violations: the fallback's own, when it
    has an envelope and the series violates it (then nothing ran).
    """

    status: EnvelopeStatus
    action: OutsideEnvelope
    checked: EngineIdentity
    ran: EngineIdentity | None
    measurement: SeriesMeasurement | None
    violations: tuple[str, ...] = ()
    fallback_violations: tuple[str, ...] = ()

    def derivation_note(self) -> str:
        """The sentence added to the derived series' Derivation Description ('' for "none")."""
        why = "; ".join(self.violations)
        if self.status is EnvelopeStatus.INSIDE:
            return f"Input inside the validated envelope of {self.checked.name}."
        if self.status is EnvelopeStatus.FALLBACK and self.ran is not None:
            return (
                f"Input outside the validated envelope of {self.checked.short} ({why}); "
                f"fallback engine {self.ran.name}."
            )
        if self.status is EnvelopeStatus.OUTSIDE_PROCESSED:
            return (
                f"Processed outside the validated envelope of {self.checked.short} at the "
                f"site's request: {why}."
            )
        return ""

    def reason(self) -> str:
        """Why nothing ran (status "outside-failed"): the engine and every violation."""
        text = (
            f"the series is outside the validated envelope of engine {self.checked.short} "
            f"({'; '.join(self.violations)}); outside_envelope = {self.action.value}"
        )
        if self.fallback_violations and self.ran is None:
            text += (
                ", and it is also outside the validated envelope of the fallback engine "
                f"({'; '.join(self.fallback_violations)}); no further fallback is tried"
            )
        return text

    def as_log(self) -> dict[str, Any]:
        """Fields for the summary and the logs: status, action, engines, violations and the
        measurement (spacing, thickness, matrix, kernel name, noise; no patient data)."""
        fields: dict[str, Any] = {
            "envelope": self.status.value,
            "envelope_action": self.action.value,
            "envelope_engine": self.checked.short,
            "envelope_violations": list(self.violations),
        }
        if self.fallback_violations:
            fields["fallback_violations"] = list(self.fallback_violations)
        if self.measurement is not None:
            fields.update(self.measurement.as_log())
        return fields


class OutsideEnvelopeError(EngineError):
    """The series is outside the engine's validated envelope and the route says fail (or the
    fallback is outside its own envelope too). A RuntimeError: the job fails as bad input."""

    def __init__(self, check: EnvelopeCheck) -> None:
        super().__init__(check.reason())
        self.check = check


def _first_value(value: object) -> str | None:
    """A header value as text; the first value of a multi-valued one (ConvolutionKernel may be
    'Br40d\\3': the kernel and its strength). None when absent or empty."""
    if value is None:
        return None
    if isinstance(value, MultiValue | list | tuple):
        return next((text for v in value if (text := str(v).strip())), None)
    return str(value).strip() or None


def series_header_values(loaded: LoadedSeries) -> tuple[float | None, str | None]:
    """(SliceThickness in mm, ConvolutionKernel) of the series' first slice, read from the
    per-frame functional groups for Enhanced CT; None where absent or unreadable."""
    source = loaded.frame_sources[0]
    dataset = loaded.datasets[source.dataset_index]
    frame = frame_header(dataset, source.frame_number)

    def get(keyword: str) -> object:
        value = frame.get(keyword)
        return dataset.get(keyword) if value in (None, "") else value

    thickness_text = _first_value(get("SliceThickness"))
    try:
        thickness = float(thickness_text) if thickness_text is not None else None
    except ValueError:
        thickness = None
    return thickness, _first_value(get("ConvolutionKernel"))


def measure_loaded(loaded: LoadedSeries) -> SeriesMeasurement:
    """The envelope measurement of a decoded series (`engine.envelope.measure_series`)."""
    thickness, kernel = series_header_values(loaded)
    return measure_series(
        loaded.volume_hu, loaded.geometry, slice_thickness_mm=thickness, source_kernel=kernel
    )


def choose_engine(
    engine: Engine, measure: Callable[[], SeriesMeasurement], policy: EnvelopePolicy
) -> tuple[Engine, EnvelopeCheck]:
    """The engine to run on a series, and why (module docstring). `measure` is called at most
    once, and only when an envelope has to be checked. Raises OutsideEnvelopeError."""
    envelope = engine_envelope(engine)
    if envelope is None:
        return engine, EnvelopeCheck(
            EnvelopeStatus.NONE, policy.action, engine.identity, engine.identity, None
        )
    measurement = measure()
    violations = envelope.violations(measurement)
    base = EnvelopeCheck(
        EnvelopeStatus.INSIDE,
        policy.action,
        engine.identity,
        engine.identity,
        measurement,
        violations,
    )
    if not violations:
        return engine, base
    if policy.action is OutsideEnvelope.PROCESS:
        return engine, _with(base, EnvelopeStatus.OUTSIDE_PROCESSED, engine.identity)
    if policy.action is OutsideEnvelope.FAIL:
        raise OutsideEnvelopeError(_with(base, EnvelopeStatus.OUTSIDE_FAILED, None))
    if policy.fallback is None:
        raise ValueError("outside_envelope = fallback needs a fallback engine")
    fallback = policy.fallback()
    fallback_envelope = engine_envelope(fallback)
    if fallback_envelope is not None:
        fallback_violations = fallback_envelope.violations(measurement)
        if fallback_violations:
            raise OutsideEnvelopeError(
                EnvelopeCheck(
                    EnvelopeStatus.OUTSIDE_FAILED,
                    policy.action,
                    engine.identity,
                    None,
                    measurement,
                    violations,
                    fallback_violations,
                )
            )
    return fallback, _with(base, EnvelopeStatus.FALLBACK, fallback.identity)


def _with(
    check: EnvelopeCheck, status: EnvelopeStatus, ran: EngineIdentity | None
) -> EnvelopeCheck:
    return replace(check, status=status, ran=ran)
