"""The spool writes durably under validated UID names and refuses when it cannot."""

import os
import threading
from pathlib import Path

import pytest

from dicom_node.spool import Spool, SpoolError
from engine.dicom_facts import is_valid_uid


@pytest.mark.parametrize("uid", ["1.2.840.10008.5.1.4.1.1.2", "2.25.1234567890", "1.0.3"])
def test_valid_uids(uid):
    assert is_valid_uid(uid)


@pytest.mark.parametrize(
    "uid",
    [
        "",
        "1",
        "1..2",
        "1.02",
        "../../etc/passwd",
        "1.2/3",
        "1.2.3\x00",
        "a.b",
        "1." + "1" * 63,
        None,
        1.2,
    ],
)
def test_invalid_uids_never_reach_a_path(uid):
    assert not is_valid_uid(uid)


def test_store_writes_file_atomically_under_series_folder(tmp_path):
    spool = Spool(tmp_path)
    p, created = spool.store("1.2.3", "1.2.3.4", b"DICM-bytes")
    assert created
    assert p == tmp_path / "1.2.3" / "1.2.3.4.dcm"
    assert p.read_bytes() == b"DICM-bytes"
    assert [x.name for x in p.parent.iterdir()] == ["1.2.3.4.dcm"], "no temporary file left behind"


def test_path_traversal_uid_is_refused(tmp_path):
    with pytest.raises(ValueError, match="invalid UID"):
        Spool(tmp_path).store("..", "1.2.3", b"x")


def test_unwritable_spool_raises_spool_error(tmp_path):
    if os.geteuid() == 0:
        # root ignores permissions; make the series folder a file instead
        (tmp_path / "1.2.3").write_text("not a folder")
    else:
        tmp_path.chmod(0o500)
    with pytest.raises(SpoolError, match="cannot write to the spool"):
        Spool(tmp_path).store("1.2.3", "1.2.3.4", b"x")


def test_minimum_free_space_refuses_before_writing(tmp_path):
    spool = Spool(tmp_path, min_free_bytes=1 << 62)
    with pytest.raises(SpoolError, match="free disk space below"):
        spool.store("1.2.3", "1.2.3.4", b"x")
    assert not (tmp_path / "1.2.3" / "1.2.3.4.dcm").exists()


def test_concurrent_writers_of_one_instance_all_succeed_and_the_first_copy_wins(tmp_path):
    """Defect 6: threads shared one temporary name, so one of 4 concurrent copies failed with
    'No such file or directory' (answered 0xA700)."""
    spool = Spool(tmp_path)
    barrier = threading.Barrier(8)
    results: list[tuple[Path, bool]] = []
    errors: list[BaseException] = []

    def write(i: int) -> None:
        barrier.wait()
        try:
            results.append(spool.store("1.2.3", "1.2.3.4", f"copy {i}".encode() * 1000))
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sum(created for _, created in results) == 1, "exactly one writer created the file"
    (target,) = {p for p, _ in results}
    content = target.read_bytes()
    assert content.startswith(b"copy ") and len(set(content.split(b"copy ")[1:])) == 1, (
        "the file is one writer's complete copy, never a mix"
    )
    assert [x.name for x in target.parent.iterdir()] == ["1.2.3.4.dcm"]


def test_a_second_copy_never_rewrites_the_first(tmp_path):
    spool = Spool(tmp_path)
    p, created = spool.store("1.2.3", "1.2.3.4", b"first")
    inode = p.stat().st_ino
    p2, created2 = spool.store("1.2.3", "1.2.3.4", b"second")
    assert (created, created2) == (True, False)
    assert p2 == p and p.read_bytes() == b"first" and p.stat().st_ino == inode


def test_sweep_removes_orphans_and_temporaries_and_keeps_recorded_files(tmp_path):
    """Defect 9: files no record points to were never deleted."""
    spool = Spool(tmp_path)
    kept, _ = spool.store("1.2.3", "1.2.3.4", b"recorded")
    orphan, _ = spool.store("1.2.3", "1.2.3.5", b"never acknowledged")
    (tmp_path / "1.2.3" / ".1.2.3.6.dcm.1.2.abc.tmp").write_bytes(b"partial")
    lonely, _ = spool.store("1.2.9", "1.2.9.1", b"orphan series")
    result = spool.sweep([str(kept)])
    assert (result.orphans, result.temporaries) == (2, 1)
    assert kept.exists() and not orphan.exists() and not lonely.parent.exists()
    assert [x.name for x in (tmp_path / "1.2.3").iterdir()] == ["1.2.3.4.dcm"]
