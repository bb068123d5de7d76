"""Read a series' files before its job: parsed headers and decoded HU, kept until the job.

While a series is still being received (and during the stable age that closes it), the engine
process is idle. The node hints it at the files of the series that will be standardized next,
and `ReadAhead.read` parses, checks and decodes them then, so that the job's `load_series`
finds them done instead of spending most of a second of CPU on 300 slices after the series
closed.

What is kept per file: the dataset without its Pixel Data (the derived series never copies it),
the decoded HU frames (float32), and the file's identity (device, inode, size, modification
time, taken from the open file it was read from). `take` hands an entry over only when the path
still names that very file, so a file replaced since (an instance received again) is read again
by the job; `load_series` then treats an entry exactly as a file it has just read. A file that
cannot be read, is not a CT image or does not decode is not kept: the job reads it again and
reports the error as it always has.

Memory is bounded: entries stop being added once their decoded pixels would pass `max_bytes`
(the job reads the rest itself), and the owner clears the cache after every job and whenever
the hint moves to another series.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from engine.dicom_facts import drop_pixel_data
from engine.interface import FloatVolume
from engine.pixels import dataset_frames_to_hu, frame_count

FileIdentity = tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns


@dataclass(frozen=True)
class ReadFile:
    """One file read ahead: its dataset without pixel data and its HU frames [frames, r, c]."""

    dataset: Dataset
    hu_frames: FloatVolume
    identity: FileIdentity


def file_identity(st: os.stat_result) -> FileIdentity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class ReadAhead:
    """Files of one series read ahead of its job, at most `max_bytes` of decoded pixels."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.series_key: str | None = None  # what the entries belong to (the owner's label)
        self._entries: dict[str, ReadFile] = {}
        self._failed: set[str] = set()
        self._pending: dict[str, None] = {}  # hinted, not read yet (a dict keeps the order)
        self._bytes = 0
        self.taken = 0  # entries handed over by `take` since the last clear

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes_held(self) -> int:
        return self._bytes

    @property
    def full(self) -> bool:
        return self._bytes >= self.max_bytes

    def clear(self) -> None:
        self._entries.clear()
        self._failed.clear()
        self._pending.clear()
        self._bytes = 0
        self.taken = 0
        self.series_key = None

    def read(
        self,
        series_key: str,
        paths: Iterable[str],
        interrupted: Callable[[], bool] = lambda: False,
    ) -> int:
        """Add `paths` to the files to read for `series_key` (dropping everything held for
        another series), then read the files still to read, in order, until none is left, the
        cache is full, or `interrupted()` is true (asked before each file); what is left stays
        to read for the next call. Returns how many files were added to the cache."""
        if series_key != self.series_key:
            self.clear()
            self.series_key = series_key
        for given in paths:
            path = str(Path(given))  # the key `take` looks up
            if path not in self._entries and path not in self._failed:
                self._pending.setdefault(path, None)
        added = 0
        while self._pending and not self.full and not interrupted():
            path = next(iter(self._pending))
            del self._pending[path]
            entry = _read_file(Path(path), self.max_bytes - self._bytes)
            if entry is None:
                self._failed.add(path)  # not tried again for this series
                continue
            self._entries[path] = entry
            self._bytes += entry.hu_frames.nbytes
            added += 1
        return added

    @property
    def pending(self) -> int:
        """Files hinted and not read yet."""
        return len(self._pending)

    def take(self, path: str | os.PathLike[str]) -> ReadFile | None:
        """The entry of `path`, removed from the cache, when the path still names the file it
        was read from; None otherwise (the caller reads the file)."""
        entry = self._entries.pop(str(path), None)
        if entry is None:
            return None
        self._bytes -= entry.hu_frames.nbytes
        try:
            current = file_identity(Path(path).stat())
        except OSError:
            return None
        if current != entry.identity:
            return None
        self.taken += 1
        return entry


def _read_file(path: Path, room: int) -> ReadFile | None:
    """Parse, check and decode one file whose decoded pixels fit in `room` bytes (known from
    its header before decoding, so that an idle process never decodes what it cannot keep);
    None for anything else, which the job reads for itself."""
    # Imported here: series_io imports this module's ReadFile.
    from engine.series_io import check_instance  # noqa: PLC0415

    try:
        with path.open("rb") as f:
            identity = file_identity(os.fstat(f.fileno()))
            ds = pydicom.dcmread(f)
        check_instance(ds, path.name)
        if int(ds.Rows) * int(ds.Columns) * frame_count(ds) * 4 > room:
            return None
        hu = dataset_frames_to_hu(ds)
    except Exception:  # noqa: BLE001 - whatever it is, the job reads the file and reports it
        return None
    drop_pixel_data(ds)
    return ReadFile(ds, np.ascontiguousarray(hu, dtype=np.float32), identity)
