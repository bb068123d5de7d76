"""Reception first (dicom_node/reception_first.py): when a running job's engine process is
paused for reception, and when it continues. Pure: times are given, nothing sleeps."""

from __future__ import annotations

from dicom_node.reception_first import RECEPTION_QUIET_S, PauseAction, ReceptionPause

PAUSE, RESUME = PauseAction.PAUSE, PauseAction.RESUME


def test_a_job_pauses_while_instances_arrive_and_continues_once_reception_is_quiet() -> None:
    pause = ReceptionPause(budget_s=60.0)
    assert pause.update(10.0, None) is None, "nothing received yet"
    assert pause.update(10.0, 9.0) is None, "the last instance came a second ago: quiet"
    assert pause.update(10.1, 10.05) is PAUSE
    assert pause.paused
    assert pause.update(10.2, 10.15) is None, "still paused"
    resumed = 10.2 + RECEPTION_QUIET_S + 0.01
    assert pause.update(resumed, 10.2) is RESUME
    assert not pause.paused
    assert pause.paused_s(11.0) == resumed - 10.1
    assert pause.update(12.0, 11.9) is PAUSE, "the next burst pauses it again"
    assert pause.pauses == 2


def test_the_quiet_threshold_is_a_strict_gap() -> None:
    pause = ReceptionPause(budget_s=60.0, quiet_s=0.5)
    assert pause.update(10.5, 10.0) is None  # exactly 0.5 s ago: quiet
    assert pause.update(10.49, 10.0) is PAUSE


def test_the_budget_bounds_the_pauses_of_one_job_in_all() -> None:
    pause = ReceptionPause(budget_s=1.0)
    assert pause.update(0.0, 0.0) is PAUSE
    assert pause.update(0.6, 0.6) is None
    assert pause.update(1.0, 1.0) is RESUME, "a PACS that never stops sending"
    assert pause.update(1.1, 1.1) is None, "spent: it runs to the end"
    assert pause.update(5.0, 5.0) is None
    assert pause.paused_s(5.0) == 1.0


def test_a_budget_left_after_a_short_pause_is_used_by_the_next_burst() -> None:
    pause = ReceptionPause(budget_s=1.0)
    assert pause.update(0.0, 0.0) is PAUSE
    assert pause.update(0.75, 0.125) is RESUME  # quiet after 0.75 s
    assert pause.update(2.0, 2.0) is PAUSE
    assert pause.update(2.125, 2.125) is None
    assert pause.update(2.25, 2.25) is RESUME, "0.25 s was left of the budget"
    assert pause.paused_s(3.0) == 1.0


def test_a_budget_of_zero_never_pauses() -> None:
    pause = ReceptionPause(budget_s=0.0)
    assert pause.update(1.0, 1.0) is None
    assert pause.pauses == 0
