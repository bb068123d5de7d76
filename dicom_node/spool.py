"""The spool: received instances on disk, durable before the node answers Success.

Layout: <spool>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm, both names validated UIDs. A file is
written to a temporary name unique to the writing thread, flushed and fsynced, then *linked* to
its final name and the directory fsynced, so after Success the instance survives a power cut.

First writer wins: `os.link` fails when the final name exists, so a second copy of the same SOP
Instance (a resend, or the same instance arriving on several associations at once) never replaces
or rewrites a file that is already there; the duplicate's temporary file is removed and the
existing copy, complete and fsynced by its writer, is kept. A final name therefore only ever holds
a complete file.

Files that no database record points to (the node stopped between the link and the database
commit, so the sender never got Success) are orphans; `sweep` removes them and stray temporary
files at start-up, before the listener accepts anything.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from engine.dicom_facts import is_valid_uid
from engine.durable import (
    TEMPORARY_SUFFIX,
    Pieces,
    content_length,
    fsync_directory,
    write_first,
)


class SpoolError(OSError):
    """The spool cannot store an instance (disk full, not writable, ...)."""


@dataclass(frozen=True)
class SweepResult:
    orphans: int  # complete files no record points to
    temporaries: int  # partial files of interrupted writes
    bytes_freed: int


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

    def store(
        self, series_uid: str, sop_uid: str, data: bytes | memoryview | Pieces
    ) -> tuple[Path, bool]:
        """Store one encoded instance durably; raises SpoolError if it cannot.

        `data` is the file's bytes, or its pieces in order (a Part 10 header and the received
        dataset's buffer), written with one writev. Returns the path and whether this call
        created it (False: a copy was already there).
        """
        target = self.path_for(series_uid, sop_uid)
        try:
            size = content_length(data)
            if self.min_free_bytes and self.free_bytes() - size < self.min_free_bytes:
                raise SpoolError(
                    f"free disk space below the configured minimum ({self.min_free_bytes >> 20} MB)"
                )
            if not target.parent.is_dir():
                target.parent.mkdir(parents=True, exist_ok=True)
                fsync_directory(self.root)
            created = write_first(target, data)
        except SpoolError:
            raise
        except OSError as exc:
            raise SpoolError(f"cannot write to the spool: {exc.strerror or exc}") from exc
        return target, created

    def discard(self, path: Path) -> None:
        """Remove a spooled file that no record will point to (a refused instance)."""
        with contextlib.suppress(OSError):  # if it stays, the start-up sweep removes it
            path.unlink(missing_ok=True)

    def remove_series(self, series_uid: str) -> None:
        if is_valid_uid(series_uid):
            shutil.rmtree(self.root / series_uid, ignore_errors=True)

    def sweep(self, recorded: Iterable[str]) -> SweepResult:
        """Remove temporary files and files no record points to; then empty series folders.

        Call only while nothing writes to the spool (at start-up, before the listener runs).
        """
        keep = {str(Path(p)) for p in recorded}
        orphans = temporaries = freed = 0
        for series_dir in self.root.iterdir():
            if not series_dir.is_dir():
                continue
            for entry in series_dir.iterdir():
                if str(entry) in keep:
                    continue
                try:
                    size = entry.stat().st_size
                    entry.unlink()
                except OSError:
                    continue
                freed += size
                if entry.name.endswith(TEMPORARY_SUFFIX):
                    temporaries += 1
                else:
                    orphans += 1
            with contextlib.suppress(OSError):
                series_dir.rmdir()  # only when empty
        return SweepResult(orphans, temporaries, freed)
