"""Series completeness: a rule, not a guess from association release. Pure logic, no I/O.

A series is complete when no instance has arrived for `stable_age_s` seconds (Orthanc calls this
StableAge), or earlier when the expected number of instances is known (ImagesInAcquisition, or
NumberOfFrames-style single-instance series) and has been reached.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from dicom_node.config import AssemblyConfig
from dicom_node.store import SeriesRow


@dataclass(frozen=True)
class ReadySeries:
    series: SeriesRow
    why: str  # "stable" or "expected-count"


def ready_series(
    receiving: Iterable[SeriesRow], now: float, cfg: AssemblyConfig, clock_start: float = 0.0
) -> list[ReadySeries]:
    """The series that are complete at `now`.

    `clock_start`: idle time is counted from no earlier than this (the node's start), so a
    series whose last instance arrived before a stop gets a full stable-age window after the
    restart for its sender to resume, however long the node was down.
    """
    ready = []
    for s in receiving:
        if (
            cfg.use_expected_counts
            and s.expected_count is not None
            and s.n_instances >= s.expected_count
        ):
            ready.append(ReadySeries(s, "expected-count"))
        elif now - max(s.last_received, clock_start) >= cfg.stable_age_s:
            ready.append(ReadySeries(s, "stable"))
    return ready


def next_stable_at(
    receiving: Iterable[SeriesRow], cfg: AssemblyConfig, clock_start: float = 0.0
) -> float | None:
    """When the first of the series still receiving becomes stable if nothing more arrives
    (the time `ready_series` would first return it); None when none is receiving."""
    return min(
        (max(s.last_received, clock_start) + cfg.stable_age_s for s in receiving), default=None
    )
