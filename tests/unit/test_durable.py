"""engine/durable.py: a final name only ever holds a complete, fsynced file."""

import os
from pathlib import Path

import pytest

from engine import durable


@pytest.fixture
def fsyncs(monkeypatch):
    """Record what is fsynced: ("file", path) or ("dir", path)."""
    calls: list[tuple[str, str]] = []
    real_fsync = os.fsync

    def fsync(fd):
        target = Path(f"/proc/self/fd/{fd}").readlink()
        calls.append(("dir" if target.is_dir() else "file", str(target)))
        real_fsync(fd)

    monkeypatch.setattr(durable.os, "fsync", fsync)
    return calls


def test_write_first_fsyncs_the_file_before_naming_it_then_the_directory(tmp_path, fsyncs):
    target = tmp_path / "a.dcm"
    assert durable.write_first(target, b"first") is True
    assert target.read_bytes() == b"first"
    kinds = [kind for kind, _ in fsyncs]
    assert kinds == ["file", "dir"], f"file data, then the directory entry: {fsyncs}"
    assert fsyncs[1][1] == str(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.dcm"], "no temporary file left"


def test_write_first_keeps_the_existing_file(tmp_path):
    target = tmp_path / "a.dcm"
    durable.write_first(target, b"first")
    assert durable.write_first(target, memoryview(b"second")) is False
    assert target.read_bytes() == b"first", "first writer wins"
    assert [p.name for p in tmp_path.iterdir()] == ["a.dcm"]


def test_write_replacing_replaces_and_can_leave_the_directory_to_the_caller(tmp_path, fsyncs):
    target = tmp_path / "b.dcm"
    durable.write_replacing(target, b"old")
    durable.write_replacing(target, lambda handle: handle.write(b"new"), sync_directory=False)
    assert target.read_bytes() == b"new", "last writer wins"
    assert [kind for kind, _ in fsyncs] == ["file", "dir", "file"]
    assert [p.name for p in tmp_path.iterdir()] == ["b.dcm"]


def test_a_failed_write_leaves_neither_a_final_nor_a_temporary_file(tmp_path):
    def explode(handle):
        handle.write(b"half")
        raise RuntimeError("encoder failed")

    with pytest.raises(RuntimeError, match="encoder failed"):
        durable.write_replacing(tmp_path / "c.dcm", explode)
    assert list(tmp_path.iterdir()) == []


def test_temporary_names_are_hidden_unique_and_swept_by_suffix(tmp_path):
    target = Path(tmp_path / "d.dcm")
    first, second = durable.temporary_name(target), durable.temporary_name(target)
    assert first != second
    assert first.parent == tmp_path and first.name.startswith(".d.dcm.")
    assert first.name.endswith(durable.TEMPORARY_SUFFIX)


def test_pieces_are_written_in_order_across_short_writes(tmp_path, monkeypatch):
    """writev(2) may write less than asked (a signal, a nearly full disk): the rest follows."""
    real_writev = os.writev
    calls = []

    def short_writev(fd, buffers):
        calls.append(len(buffers))
        return real_writev(fd, [memoryview(buffers[0])[:7]])  # 7 bytes at most per call

    monkeypatch.setattr(durable.os, "writev", short_writev)
    target = tmp_path / "f"
    pieces = (b"header-", memoryview(bytearray(b"0123456789" * 3)), b"", b"tail")
    assert durable.write_first(target, pieces) is True
    assert target.read_bytes() == b"header-" + b"0123456789" * 3 + b"tail"
    assert len(calls) > 3
    assert durable.content_length(pieces) == len(target.read_bytes())


def test_a_failed_piece_write_leaves_no_file(tmp_path, monkeypatch):
    def failing_writev(fd, buffers):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(durable.os, "writev", failing_writev)
    target = tmp_path / "f"
    with pytest.raises(OSError, match="No space"):
        durable.write_first(target, (b"a", b"b"))
    assert list(tmp_path.iterdir()) == []
