"""What receiver processes share: the association counts (SharedCounts) and the byte-range locks
that serialize copies of one SOP Instance across processes (scp.InstanceLocks)."""

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from dicom_node.receivers import SharedCounts
from dicom_node.scp import InstanceLocks


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
