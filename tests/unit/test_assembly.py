"""Series completeness: idle time per series, or the expected count when known."""

from dicom_node.assembly import ready_series
from dicom_node.config import AssemblyConfig
from dicom_node.store import SeriesRow, SeriesState


def _series(last: float, n: int = 10, expected: int | None = None) -> SeriesRow:
    return SeriesRow("1.2.3", "1.2", SeriesState.RECEIVING, 0, n, expected, 0.0, last, False, {})


def test_series_is_complete_only_after_the_stable_age():
    cfg = AssemblyConfig(stable_age_s=60)
    assert ready_series([_series(last=100)], now=159.9, cfg=cfg) == []
    (ready,) = ready_series([_series(last=100)], now=160.0, cfg=cfg)
    assert ready.why == "stable"


def test_expected_count_completes_early():
    cfg = AssemblyConfig(stable_age_s=60)
    (ready,) = ready_series([_series(last=100, n=26, expected=26)], now=100.5, cfg=cfg)
    assert ready.why == "expected-count"
    assert ready_series([_series(last=100, n=25, expected=26)], now=100.5, cfg=cfg) == []


def test_expected_count_ignored_when_disabled():
    cfg = AssemblyConfig(stable_age_s=60, use_expected_counts=False)
    assert ready_series([_series(last=100, n=26, expected=26)], now=100.5, cfg=cfg) == []
