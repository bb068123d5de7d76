"""Exporter bookkeeping without a network: confirmation groups, what is recorded when, and
which outcomes count as a failed attempt."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

import pytest

from dicom_node import export
from dicom_node.config import DestinationConfig
from dicom_node.export import (
    CONFIRM_GROUP_AGE_S,
    CONFIRM_GROUP_MAX,
    ConfirmationGroup,
    Exporter,
    SendResult,
    _AnswersForTheWaiter,
)
from dicom_node.store import ExportState, InstanceRecord, JobKind, JobStore

N_OUT = 40


def test_group_is_recorded_when_it_reaches_its_count():
    g = ConfirmationGroup(max_count=3, max_age_s=10.0)
    assert g.add(1, 0.0) == []
    assert g.add(2, 0.1) == []
    assert g.add(3, 0.2) == [1, 2, 3]
    assert len(g) == 0
    assert g.add(4, 0.3) == [], "a new group starts after a recorded one"


def test_group_is_recorded_when_its_first_confirmation_is_old_enough():
    g = ConfirmationGroup(max_count=16, max_age_s=0.25)
    assert g.add(1, 10.0) == []
    assert g.add(2, 10.2) == []
    assert g.due(10.24) == []
    assert g.due(10.25) == [1, 2], "age counts from the first id of the group"
    assert g.due(99.0) == [], "nothing held, nothing due"
    assert g.add(3, 20.0) == [] and g.add(4, 20.3) == [3, 4]


def test_group_take_returns_everything_held_once():
    g = ConfirmationGroup()
    g.add(7, 0.0)
    g.add(8, 0.0)
    assert g.take() == [7, 8]
    assert g.take() == []


def test_group_never_holds_more_than_max_count_minus_one_between_calls():
    g = ConfirmationGroup(max_count=CONFIRM_GROUP_MAX, max_age_s=CONFIRM_GROUP_AGE_S)
    recorded: list[int] = []
    for i in range(100):
        recorded += g.add(i, 0.0)  # all at once: only the count bound applies
        assert len(g) <= CONFIRM_GROUP_MAX - 1
    assert recorded + g.take() == list(range(100))


@pytest.mark.parametrize(("count", "age"), [(0, 1.0), (1, -1.0)])
def test_group_bounds_are_validated(count, age):
    with pytest.raises(ValueError, match="max_count"):
        ConfirmationGroup(count, age)


# ---- the guarded DIMSE queue ---------------------------------------------------------------


class _Msg:
    def __init__(self, request: bool) -> None:
        self.is_valid_request = request


def test_guarded_queue_keeps_answers_for_the_blocking_waiter():
    q = _AnswersForTheWaiter()
    answer = (1, _Msg(request=False))
    q.put(answer)
    with pytest.raises(queue.Empty):
        q.get(block=False)  # the reactor's poll
    with pytest.raises(queue.Empty):
        q.get_nowait()
    assert q.get(block=True, timeout=1) is answer, "send_c_store's wait gets the answer"


def test_guarded_queue_keeps_the_abort_marker_for_the_blocking_waiter():
    q = _AnswersForTheWaiter()
    q.put((None, None))
    with pytest.raises(queue.Empty):
        q.get(block=False)
    assert q.get(timeout=1) == (None, None)


def test_guarded_queue_still_hands_requests_to_the_reactor():
    q = _AnswersForTheWaiter()
    request = (3, _Msg(request=True))
    q.put(request)
    assert q.get(block=False) is request


# ---- Exporter.run_once with a scripted send -------------------------------------------------


def _dest(associations: int = 1) -> DestinationConfig:
    return DestinationConfig(
        name="pacs",
        ae_title="PACS",
        host="127.0.0.1",
        port=1,
        backoff_initial_s=5.0,
        associations=associations,
    )


@pytest.fixture
def store_with_exports(tmp_path: Path):
    store = JobStore(tmp_path / "db.sqlite3")
    store.record_instance(
        InstanceRecord(
            sop_uid="1.2.3.1",
            series_uid="1.2.3",
            study_uid="1.2",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            transfer_syntax="1.2.840.10008.1.2.1",
            path=Path("/spool/1.2.3/1.2.3.1.dcm"),
            size_bytes=10,
            calling_ae="PACS",
            header={"Modality": "CT"},
            own_output=False,
            expected_count=None,
        ),
        now=100.0,
    )
    job_id = store.complete_series(
        "1.2.3", 0, job_kind=JobKind.STANDARDIZE, rule="r", engine="e", destinations=("pacs",)
    )
    assert store.claim_job("w", (JobKind.STANDARDIZE,)) is not None
    outs = [(f"9.9.{i}", "1.2.840.10008.5.1.4.1.1.2", Path(f"/o/{i}.dcm")) for i in range(N_OUT)]
    store.start_export(job_id, outs, ("pacs",), derived_series_uid="9.9", summary={}, now=0.0)
    yield store
    store.close()


def _states(store: JobStore) -> dict[str, list[tuple[int, int]]]:
    by: dict[str, list[tuple[int, int]]] = {}
    for r in store._query("SELECT id, state, attempts FROM exports ORDER BY id"):
        by.setdefault(r["state"], []).append((r["id"], r["attempts"]))
    return by


def _exporter(store: JobStore, associations: int = 1) -> Exporter:
    return Exporter(
        _dest(associations),
        store,
        calling_ae="LTDIFF",
        stop=threading.Event(),
        wake=threading.Event(),
        on_progress=lambda: None,
    )


def test_confirmations_are_recorded_while_sending_not_after_the_batch(
    store_with_exports, monkeypatch
):
    store = store_with_exports
    unrecorded_before_each_send: list[int] = []

    def fake_send(dest, calling_ae, rows, *, on_result=None, keep_going=None, held=None, **_kw):
        for i, r in enumerate(rows):
            # what a kill -9 right now would resend: confirmed but not recorded
            n_sent = len(_states(store).get(ExportState.SENT.value, []))
            unrecorded_before_each_send.append(i - n_sent)
            on_result(r, None)
        return SendResult([r.id for r in rows], [])

    monkeypatch.setattr(export, "send_files", fake_send)
    assert _exporter(store).run_once(1e12)
    assert max(unrecorded_before_each_send) <= CONFIRM_GROUP_MAX - 1
    assert len(_states(store)[ExportState.SENT.value]) == N_OUT, "the last group at the end"


def test_a_batch_is_split_between_the_destinations_associations(store_with_exports, monkeypatch):
    """With `associations = 2` the due instances go out over two kept associations at once,
    each instance over exactly one, and every confirmation is recorded."""
    store = store_with_exports
    ex = _exporter(store, associations=2)
    lanes: dict[int, list[int]] = {}
    both_running = threading.Barrier(2, timeout=30)

    def fake_send(dest, calling_ae, rows, *, on_result=None, keep_going=None, held=None, **_kw):
        lane = ex.lanes.index(held)
        both_running.wait()  # fails unless the two lanes send at the same time
        lanes[lane] = [r.id for r in rows]
        for r in rows:
            on_result(r, None)
        return SendResult([r.id for r in rows], [])

    monkeypatch.setattr(export, "send_files", fake_send)
    try:
        assert ex.run_once(1e12)
    finally:
        ex.stop_event.set()
        assert ex._lane_pool is not None
        ex._lane_pool.shutdown()
    assert sorted(lanes) == [0, 1]
    assert len(lanes[0]) == len(lanes[1]) == N_OUT // 2
    assert sorted(lanes[0] + lanes[1]) == [i for i, _ in _states(store)[ExportState.SENT.value]]
    assert len(_states(store)[ExportState.SENT.value]) == N_OUT


def test_a_small_batch_goes_out_on_one_association(store_with_exports):
    ex = _exporter(store_with_exports, associations=4)
    assert ex.lanes_for(export.LANE_MIN_INSTANCES * 2 - 1, now=0.0) == 1
    assert ex.lanes_for(export.LANE_MIN_INSTANCES * 2, now=0.0) == 2
    assert ex.lanes_for(1000, now=0.0) == 4


def test_an_extra_association_the_destination_refuses_counts_no_attempt(
    store_with_exports, monkeypatch
):
    """A PACS that takes one association from us refuses the second: its share goes out at
    once over the first, no attempt counted, and the exporter uses one association for
    LANES_REDUCED_S."""
    store = store_with_exports
    ex = _exporter(store, associations=2)
    batches: list[tuple[int, int]] = []

    def fake_send(dest, calling_ae, rows, *, on_result=None, keep_going=None, held=None, **kw):
        lane = ex.lanes.index(held)
        batches.append((lane, len(rows)))
        if lane == 1:
            assert kw["refusal_counts"] is False
            return SendResult([], [], list(rows), refused="association rejected")
        for r in rows:
            on_result(r, None)
        return SendResult([r.id for r in rows], [])

    monkeypatch.setattr(export, "send_files", fake_send)
    try:
        assert ex.run_once(1e12), "the refused share goes out again at once"
        assert ex.run_once(1e12)
    finally:
        ex.stop_event.set()
        assert ex._lane_pool is not None
        ex._lane_pool.shutdown()
    assert sorted(batches) == [(0, N_OUT // 2), (0, N_OUT // 2), (1, N_OUT // 2)], batches
    states = _states(store)
    assert len(states[ExportState.SENT.value]) == N_OUT
    assert all(a == 0 for _, a in states[ExportState.SENT.value]), "no attempt counted"
    assert ex.lanes_for(N_OUT, now=1e12) == 1
    assert ex.lanes_for(N_OUT, now=1e12 + export.LANES_REDUCED_S) == 2


def test_broken_association_counts_one_attempt_and_leaves_the_rest_untouched(
    store_with_exports, monkeypatch
):
    store = store_with_exports

    def fake_send(dest, calling_ae, rows, *, on_result=None, keep_going=None, held=None, **_kw):
        for r in rows[:5]:
            on_result(r, None)
        on_result(rows[5], "no answer within dimse_timeout_s = 30 s; association aborted")
        return SendResult([r.id for r in rows[:5]], [(rows[5], "timeout")], list(rows[6:]))

    monkeypatch.setattr(export, "send_files", fake_send)
    assert _exporter(store).run_once(1e12), "the untried rest goes out again at once"
    states = _states(store)
    assert len(states[ExportState.SENT.value]) == 5
    pending = states[ExportState.PENDING.value]
    assert [a for _, a in pending] == [1] + [0] * (N_OUT - 6), "only the one in flight counts"
    due = store.due_exports("pacs", now=time.time())
    assert len(due) == N_OUT - 6, "the timed-out instance waits for its backoff"


def test_stop_request_ends_the_batch_before_the_next_instance(store_with_exports, monkeypatch):
    store = store_with_exports
    ex = _exporter(store)
    offered: list[int] = []

    def fake_send(dest, calling_ae, rows, *, on_result=None, keep_going=None, held=None, **_kw):
        for i, r in enumerate(rows):
            if not keep_going():
                return SendResult(offered[:], [], list(rows[i:]))
            offered.append(r.id)
            on_result(r, None)
            if i == 2:
                ex.stop_event.set()
        return SendResult(offered[:], [])

    monkeypatch.setattr(export, "send_files", fake_send)
    ex.run_once(1e12)
    assert len(offered) == 3
    assert len(_states(store)[ExportState.SENT.value]) == 3, "recorded before stopping"
