"""Receiver processes (`listener.receiver_processes`, dicom_node/receivers.py): associations are
spread over several processes, copies of one instance on different processes end as one file
and one record, a receiver that dies is replaced without losing anything acknowledged, and no
receiver outlives the node."""

from __future__ import annotations

import os
import signal
import threading

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage
from tests_support import free_port, log_events, process_gone, serve, wait_until, write_site_config

from dicom_node import statuses
from dicom_node.receivers import DispatchingServer, ReceiverPool
from dicom_node.service import Node
from engine.synthetic import make_ct_dataset

#: One series for every instance these tests send.
SERIES = "2.25.31415926535897932384626433832795028841"


def _ds(n: int) -> Dataset:
    """Instance `n` of the one series."""
    return make_ct_dataset(uid_seed="receivers", series_uid=SERIES, instance_number=n)


def _pool(node: Node) -> ReceiverPool:
    assert isinstance(node.server, DispatchingServer), "the node runs receiver processes"
    return node.server.pool


def _associate(node: Node, calling_ae: str = "PACS") -> Association:
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="LTDIFF")
    assert assoc.is_established
    return assoc


def _store(assoc: Association, ds: Dataset) -> int | None:
    status = assoc.send_c_store(ds)
    return int(status.Status) if "Status" in status else None


def _count(node: Node, name: str, **labels: str) -> float:
    node.server.drain()
    value = node.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_four_associations_are_served_by_more_than_one_receiver_process(start_node):
    node = start_node(receiver_processes=2)
    pool = _pool(node)
    assocs = [_associate(node) for _ in range(4)]  # all open at once
    statuses_seen: list[int | None] = []
    lock = threading.Lock()

    def send(k: int, assoc: Association) -> None:
        for i in range(3):
            status = _store(assoc, _ds(100 + 10 * k + i))
            with lock:
                statuses_seen.append(status)

    threads = [threading.Thread(target=send, args=(k, a)) for k, a in enumerate(assocs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for a in assocs:
        a.release()
    assert statuses_seen == [statuses.SUCCESS] * 12
    served_by = {pid for _, pid in pool.history}
    assert len(served_by) == 2 and os.getpid() not in served_by, (
        f"4 associations on 2 receiver processes, recorded: {list(pool.history)}"
    )
    (series,) = node.store.receiving_series()
    assert series.n_instances == 12
    assert _count(node, "ltdiff_node_instances_received_total", status="success") == 12


def test_copies_of_one_instance_sent_at_once_through_two_processes_end_as_one_file_and_record(
    start_node,
):
    node = start_node(receiver_processes=2)
    pool = _pool(node)
    assocs = [_associate(node) for _ in range(4)]
    assert len({pid for _, pid in pool.history}) == 2, "the copies go through both processes"
    try:
        for round_ in range(8):
            ds = _ds(200 + round_)
            barrier = threading.Barrier(len(assocs))
            results: list[int | None] = []

            def send(assoc: Association, ds: Dataset = ds, barrier=barrier, results=results):
                barrier.wait(timeout=30)
                results.append(_store(assoc, ds))

            threads = [threading.Thread(target=send, args=(a,)) for a in assocs]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            assert results == [statuses.SUCCESS] * 4, f"round {round_}: {results}"
    finally:
        for a in assocs:
            a.release()
    (series,) = node.store.receiving_series()
    assert series.n_instances == 8
    files = sorted((node.config.spool_dir / series.series_uid).iterdir())
    assert len(files) == 8, [f.name for f in files]
    assert sorted(str(p) for p in node.store.instance_paths()) == [str(f) for f in files]
    assert _count(node, "ltdiff_node_instances_received_total", status="success") == 8
    assert _count(node, "ltdiff_node_instances_received_total", status="duplicate") == 24


def test_a_receiver_killed_mid_association_fails_its_sender_and_the_node_keeps_receiving(
    start_node,
):
    node = start_node(receiver_processes=2)
    pool = _pool(node)
    assoc = _associate(node)
    first = _ds(300)
    assert _store(assoc, first) == statuses.SUCCESS  # acknowledged: must survive
    _, victim = pool.history[-1]
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: not assoc.is_alive(), 30, "the association to end with its process")
    assert not assoc.is_established
    with pytest.raises(RuntimeError, match="must be established"):
        _store(assoc, _ds(301))  # the sender keeps its copy and sends it again
    wait_until(
        lambda: victim not in pool.pids() and None not in pool.pids(),
        60,
        "the receiver process to be replaced",
    )
    assert node.health().ok, node.health().body()
    for k in range(4):  # new associations land on both processes, the replacement included
        again = _associate(node)
        try:
            status = _store(again, _ds(310 + k))
            assert status == statuses.SUCCESS
        finally:
            again.release()
    assert node.store.has_instance(str(first.SOPInstanceUID)), "acknowledged before the kill"
    (series,) = node.store.receiving_series()
    assert series.n_instances == 5


def test_max_associations_holds_for_the_whole_node(start_node):
    node = start_node(receiver_processes=2, max_associations=2)
    held = [_associate(node) for _ in range(2)]
    assert len({pid for _, pid in _pool(node).history}) == 2
    try:
        ae = AE(ae_title="PACS")
        ae.add_requested_context(CTImageStorage)
        third = ae.associate("127.0.0.1", node.port, ae_title="LTDIFF")
        assert third.is_rejected, "a third association, whichever process it lands on"
        wait_until(
            lambda: (
                _count(node, "ltdiff_node_association_rejections_total", reason="association_limit")
                == 1
            ),
            30,
            "the rejection counted in the main process",
        )
    finally:
        for a in held:
            a.release()
    wait_until(lambda: _pool(node).counts.total() == 0, 30, "both associations over")
    again = _associate(node)
    again.release()


def test_node_stop_leaves_no_receiver_process(start_node):
    node = start_node(receiver_processes=2)
    pids = [pid for pid in _pool(node).pids() if pid is not None]
    assert len(pids) == 2
    assoc = _associate(node)  # an association open while the node stops
    node.stop()
    for pid in pids:
        assert process_gone(pid), f"receiver process {pid} still runs after stop"
    wait_until(lambda: not assoc.is_alive(), 30, "the open association to end")


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_no_receiver_outlives_the_node_process(tmp_path, how):
    port = free_port()
    config = write_site_config(
        tmp_path / "site.toml", tmp_path / "state", port, listener="receiver_processes = 2"
    )
    log = tmp_path / "node.log"
    proc = serve(config, log)
    try:
        (started,) = [e for e in log_events(log) if e["event"] == "receivers.started"]
        pids = [int(p) for p in started["pids"]]  # type: ignore[union-attr]
        assert len(pids) == 2 and all(not process_gone(p) for p in pids)
        proc.send_signal(getattr(signal, how))
        proc.wait(timeout=60)
        for pid in pids:
            wait_until(
                lambda pid=pid: process_gone(pid), 30, f"receiver {pid} to die with the node"
            )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if how == "SIGTERM":
        assert proc.returncode == 0
        assert any(e["event"] == "receiver.stopped" for e in log_events(log))


def test_a_receiver_that_keeps_dying_makes_the_node_unhealthy_and_is_still_replaced(start_node):
    node = start_node(receiver_processes=2)
    pool = _pool(node)
    assert node.health().ok
    for kill in range(3):
        pid = pool.pids()[0]
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_until(
            lambda pid=pid: pool.pids()[0] not in (None, pid),
            60,
            f"receiver 0 replaced after kill {kill + 1}",
        )
    probe = node.health()
    assert not probe.ok
    assert "[0] keep dying" in probe.body()["checks"]["receivers"], probe.body()
    assert node.readiness().ok, "reception still works: the node is ready"
    assoc = _associate(node)
    try:
        assert _store(assoc, _ds(400)) == 0
    finally:
        assoc.release()
