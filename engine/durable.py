"""Durable file writes: a file under its final name is complete and survives a power cut.

The pattern, in one place: write to a hidden temporary name unique to the writer (process,
thread, random part) in the target's directory, flush and fsync it, then give it its final name
(`os.link`, first writer wins, or `os.replace`, last writer wins) and fsync the directory so the
name itself is durable. A reader never sees a partial file under a final name; a crash leaves at
most a temporary file ending in TEMPORARY_SUFFIX, which its owner sweeps.

Used by the spool (dicom_node/spool.py) and by the derived-series writer (engine/pipeline.py).
Lives in `engine` because the engine writes durably too and must not import `dicom_node`.
"""

from __future__ import annotations

import errno
import os
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

TEMPORARY_SUFFIX = ".tmp"

#: Pieces of a file written side by side with one writev(2) (no joined copy), e.g. a header
#: and a received dataset's buffer.
Pieces = tuple[bytes | memoryview, ...]
#: Bytes to write, pieces to write in order, or a function that writes to an open binary file.
Content = bytes | memoryview | Pieces | Callable[[BinaryIO], object]


def content_length(content: bytes | memoryview | Pieces) -> int:
    """Bytes in `content` (the sum of its pieces)."""
    if isinstance(content, tuple):
        return sum(memoryview(piece).nbytes for piece in content)
    return memoryview(content).nbytes


def write_pieces(fd: int, pieces: Pieces) -> None:
    """Write all of `pieces` to `fd` in order, with writev(2), resuming after short writes."""
    views = [memoryview(piece).cast("B") for piece in pieces]
    views = [view for view in views if view.nbytes]
    while views:
        written = os.writev(fd, views)
        if written <= 0:  # a regular file never does this; do not spin if it does
            raise OSError(errno.EIO, "writev wrote nothing")
        while written and views:
            head = views[0]
            if written >= head.nbytes:
                written -= head.nbytes
                views.pop(0)
            else:
                views[0] = head[written:]
                written = 0


def fsync_directory(path: Path) -> None:
    """fsync a directory, making the names created or renamed in it durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(target: Path) -> Path:
    """A name no other writer (thread or process) uses, hidden, in the target's directory."""
    return target.with_name(
        f".{target.name}.{os.getpid()}.{threading.get_ident()}.{uuid.uuid4().hex}{TEMPORARY_SUFFIX}"
    )


def write_temporary(target: Path, content: Content, mode: int = 0o640) -> Path:
    """Write `content` to a new temporary file beside `target`, flushed and fsynced; return its
    path. On any error the temporary file is removed and the error raised. `mode` is filtered
    by the umask, as for open(2)."""
    tmp = temporary_name(target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        if callable(content):
            with os.fdopen(fd, "wb") as handle:  # closes fd
                content(handle)
                handle.flush()
                os.fsync(handle.fileno())
        else:
            try:
                write_pieces(fd, content if isinstance(content, tuple) else (content,))
                os.fsync(fd)
            finally:
                os.close(fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_first(target: Path, content: Content, mode: int = 0o640) -> bool:
    """Write `content` to `target` durably unless `target` exists (first writer wins).

    Returns True when this call created the file, False when it was already there (the existing
    file is complete: it was fsynced before it got its name). Either way the directory entry is
    fsynced before returning.
    """
    tmp = write_temporary(target, content, mode)
    try:
        os.link(tmp, target)
        created = True
    except FileExistsError:
        created = False
    finally:
        tmp.unlink(missing_ok=True)
    fsync_directory(target.parent)
    return created


def write_replacing(
    target: Path, content: Content, mode: int = 0o640, *, sync_directory: bool = True
) -> None:
    """Write `content` to `target` durably, replacing any file there (last writer wins).

    With `sync_directory=False` the caller fsyncs the directory itself (once after writing many
    files into it) before relying on the names.
    """
    tmp = write_temporary(target, content, mode)
    try:
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    if sync_directory:
        fsync_directory(target.parent)
