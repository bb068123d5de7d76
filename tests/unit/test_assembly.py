"""Series completeness: idle time per series, or the expected count when known."""

from dicom_node.assembly import next_stable_at, ready_series
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


def test_a_series_interrupted_by_a_restart_gets_a_full_window_after_the_start():
    """Defect 7: the idle clock ran from before a crash, so a series interrupted by a restart
    longer than stable_age_s was closed half received at start-up."""
    cfg = AssemblyConfig(stable_age_s=60)
    half_received = _series(last=100, n=4)
    started = 5000.0  # the node was down for more than an hour
    assert ready_series([half_received], now=5059.9, cfg=cfg, clock_start=started) == []
    (ready,) = ready_series([half_received], now=5060.0, cfg=cfg, clock_start=started)
    assert ready.why == "stable"


def test_the_expected_count_still_completes_at_once_after_a_restart():
    cfg = AssemblyConfig(stable_age_s=60)
    (ready,) = ready_series(
        [_series(last=100, n=8, expected=8)], now=5000.5, cfg=cfg, clock_start=5000.0
    )
    assert ready.why == "expected-count"


def test_next_stable_at_is_when_the_first_receiving_series_becomes_stable():
    cfg = AssemblyConfig(stable_age_s=60)
    series = [_series(last=100), _series(last=90), _series(last=120)]
    assert next_stable_at(series, cfg) == 150.0
    assert next_stable_at(series, cfg, clock_start=95.0) == 155.0, "idle counted from the start"
    assert next_stable_at([], cfg) is None
    (ready,) = ready_series([_series(last=90)], now=150.0, cfg=cfg)
    assert ready.why == "stable", "ready_series agrees at that very time"
