"""What receiver processes share: the association counts (SharedCounts), the byte-range locks
that serialize copies of one SOP Instance across processes (scp.InstanceLocks), and the queue of
database writers (JobStore's writers_lock)."""

import fcntl
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from tests_support import wait_until

from dicom_node.receivers import SharedCounts
from dicom_node.scp import InstanceLocks
from dicom_node.store import InstanceRecord, JobStore, ReceiveOutcome


def test_counts_written_by_one_process_are_seen_by_another_mapping(tmp_path):
    path = tmp_path / "receivers.counts"
    node = SharedCounts(path, 3, create=True)
    receiver = SharedCounts(path, 3)  # as a receiver process maps it
    receiver.add(1, 2)
    receiver.add(1, -1)
    SharedCounts(path, 3).add(2, 4)
    assert (node.get(0), node.get(1), node.get(2)) == (0, 1, 4)
    assert node.total() == 5
    assert node.others(1) == 4, "what the other receivers use, for the node-wide limit"
    node.set(2, 0)  # the node zeroes the slot of a receiver that died
    assert receiver.total() == 1


def _held_by_other_process(path: Path, offset: int) -> bool:
    """Whether another process would have to wait for byte `offset` of `path`."""
    probe = (
        "import fcntl, os, sys\n"
        "fd = os.open(sys.argv[1], os.O_RDWR)\n"
        "try:\n"
        "    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, int(sys.argv[2]), 0)\n"
        "except OSError:\n"
        "    sys.exit(1)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(path), str(offset)], check=False, timeout=60
    )
    return done.returncode == 1


def test_a_held_instance_lock_makes_another_process_wait_for_that_byte_only(tmp_path):
    path = tmp_path / "receive.lock"
    locks = InstanceLocks(path)
    crc = 123_456_789
    offset = crc % InstanceLocks.BYTES
    thread_lock = threading.Lock()
    with locks.hold(thread_lock, crc):
        assert thread_lock.locked(), "the thread stripe is held too (record locks are per process)"
        assert _held_by_other_process(path, offset)
        assert not _held_by_other_process(path, (offset + 1) % InstanceLocks.BYTES)
    assert not thread_lock.locked()
    assert not _held_by_other_process(path, offset), "released on exit"
    locks.close()


def test_an_instance_lock_is_released_when_the_block_raises(tmp_path):
    path = tmp_path / "receive.lock"
    locks = InstanceLocks(path)
    with pytest.raises(RuntimeError), locks.hold(threading.Lock(), 7):
        raise RuntimeError
    assert not _held_by_other_process(path, 7)
    locks.close()


# ---- the database writers' queue (JobStore writers_lock) -----------------------------------------


def _record(sop: str) -> InstanceRecord:
    return InstanceRecord(
        sop_uid=sop,
        series_uid="1.2.3",
        study_uid="1.2",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax="1.2.840.10008.1.2.1",
        path=Path(f"/spool/1.2.3/{sop}.dcm"),
        size_bytes=10,
        calling_ae="PACS",
        header={"Modality": "CT"},
        own_output=False,
        expected_count=None,
    )


def _flock_waiters() -> int:
    """Blocked flock requests in the whole system (/proc/locks marks them '->')."""
    lines = Path("/proc/locks").read_text().splitlines()
    return sum(1 for line in lines if "->" in line and "FLOCK" in line)


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux /proc/locks")
def test_a_write_transaction_waits_for_the_writers_lock_and_commits_once_it_is_free(tmp_path):
    lock = tmp_path / "database-writers.lock"
    store = JobStore(tmp_path / "node.db", writers_lock=lock)
    other = os.open(lock, os.O_RDWR)  # another receiver's turn (its own open file description)
    fcntl.flock(other, fcntl.LOCK_EX)
    before = _flock_waiters()
    done: list[ReceiveOutcome] = []
    writer = threading.Thread(target=lambda: done.append(store.record_instance(_record("1.1"))))
    writer.start()
    try:
        wait_until(lambda: _flock_waiters() > before, what="the writer queued on the lock")
        assert not done, "the writer committed while another process held the writers lock"
        assert not JobStore(tmp_path / "node.db").has_instance("1.1")
    finally:
        fcntl.flock(other, fcntl.LOCK_UN)
        os.close(other)
        writer.join(timeout=30)
    assert done == [ReceiveOutcome.NEW]
    assert store.has_instance("1.1")
    store.close()


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux /proc/locks")
def test_the_duplicate_check_does_not_wait_for_a_write_transaction_in_progress(tmp_path):
    """has_instance reads on its own connection: an association thread checks for a duplicate
    while another thread of its process is inside its write transaction (here: waiting for the
    writers lock), and sees what is committed."""
    lock = tmp_path / "database-writers.lock"
    store = JobStore(tmp_path / "node.db", writers_lock=lock)
    assert store.record_instance(_record("1.0")) is ReceiveOutcome.NEW
    other = os.open(lock, os.O_RDWR)
    fcntl.flock(other, fcntl.LOCK_EX)
    before = _flock_waiters()
    writer = threading.Thread(target=store.record_instance, args=(_record("1.1"),))
    writer.start()
    try:
        wait_until(lambda: _flock_waiters() > before, what="the writer queued on the lock")
        answers: list[tuple[bool, bool]] = []
        checker = threading.Thread(
            target=lambda: answers.append((store.has_instance("1.0"), store.has_instance("1.1")))
        )
        checker.start()
        checker.join(timeout=30)
        assert answers == [(True, False)], "the check waited for the write transaction"
    finally:
        fcntl.flock(other, fcntl.LOCK_UN)
        os.close(other)
        writer.join(timeout=30)
    assert store.has_instance("1.1"), "committed, and seen by the next check"
    store.close()


def test_the_writers_lock_of_a_killed_process_does_not_block_the_others(tmp_path):
    lock = tmp_path / "database-writers.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('held', flush=True)\n"
            "time.sleep(600)\n",
            str(lock),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == b"held"
        holder.kill()  # a receiver killed -9 inside its transaction
        holder.wait(timeout=30)
        store = JobStore(tmp_path / "node.db", writers_lock=lock)
        assert store.record_instance(_record("1.1")) is ReceiveOutcome.NEW
        store.close()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_a_store_without_the_writers_lock_still_commits_beside_one_with_it(tmp_path):
    """The main process writes without the lock: SQLite's own locking keeps both correct."""
    db = tmp_path / "node.db"
    queued = JobStore(db, writers_lock=tmp_path / "database-writers.lock")
    plain = JobStore(db)
    assert queued.record_instance(_record("1.1")) is ReceiveOutcome.NEW
    assert plain.record_instance(_record("1.1")) is ReceiveOutcome.DUPLICATE
    assert plain.record_instance(_record("1.2")) is ReceiveOutcome.NEW
    assert queued.has_instance("1.2")
    queued.close()
    queued.close()  # closing twice is harmless
    plain.close()
