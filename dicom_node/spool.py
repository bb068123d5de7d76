"""The spool: received instances on disk, durable before the node answers Success.

Layout: <spool>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm, both names validated UIDs. A file is
written to a temporary name in the same directory, flushed and fsynced, renamed into place, and
the directory is fsynced, so after Success the instance survives a power cut.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from dicom_node.uids import is_valid_uid


class SpoolError(OSError):
    """The spool cannot store an instance (disk full, not writable, ...)."""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(target: Path, data: bytes | memoryview) -> None:
    """Write `data` to `target` atomically and durably (temp file, fsync, rename, fsync dir)."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        tmp.replace(target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


class Spool:
    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        root.mkdir(parents=True, exist_ok=True)

    def path_for(self, series_uid: str, sop_uid: str) -> Path:
        if not (is_valid_uid(series_uid) and is_valid_uid(sop_uid)):
            raise ValueError("invalid UID for a spool path")
        return self.root / series_uid / f"{sop_uid}.dcm"

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def store(self, series_uid: str, sop_uid: str, data: bytes | memoryview) -> Path:
        """Store one encoded instance durably; raises SpoolError if it cannot."""
        target = self.path_for(series_uid, sop_uid)
        try:
            if self.min_free_bytes and self.free_bytes() - len(data) < self.min_free_bytes:
                raise SpoolError(
                    f"free disk space below the configured minimum ({self.min_free_bytes >> 20} MB)"
                )
            if not target.parent.is_dir():
                target.parent.mkdir(parents=True, exist_ok=True)
                fsync_dir(self.root)
            write_durably(target, data)
        except SpoolError:
            raise
        except OSError as exc:
            raise SpoolError(f"cannot write to the spool: {exc.strerror or exc}") from exc
        return target

    def remove_series(self, series_uid: str) -> None:
        if is_valid_uid(series_uid):
            shutil.rmtree(self.root / series_uid, ignore_errors=True)
