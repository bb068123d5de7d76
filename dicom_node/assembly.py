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
    receiving: Iterable[SeriesRow], now: float, cfg: AssemblyConfig
) -> list[ReadySeries]:
    ready = []
    for s in receiving:
        if (
            cfg.use_expected_counts
            and s.expected_count is not None
            and s.n_instances >= s.expected_count
        ):
            ready.append(ReadySeries(s, "expected-count"))
        elif now - s.last_received >= cfg.stable_age_s:
            ready.append(ReadySeries(s, "stable"))
    return ready
