"""Persistent state of the node: series, instances, jobs and exports in SQLite (WAL).

Every state change the node acknowledges to a peer is committed here with synchronous=FULL before
the acknowledgement, so a restart resumes everything: a series still receiving keeps its idle
clock, a queued or interrupted job is processed (again), an export sends only what is unsent.

Job states: queued -> processing -> exporting -> done | failed (superseded when a late instance
reopens a series before its job started). A processing job goes back to queued when the node stops
cleanly (`release_job`), when it must wait for disk space (`defer_job`, with a time before which
it is not claimed), or when its engine process died (`record_crash`); a job whose engine process
died, or that was interrupted by a crash of the node, `max_attempts` times ends failed.
Series states: receiving -> complete | discarded.
Export states: pending -> sent | dead (dead letter after the destination's max_attempts).
Exports are queued when a job's output is written (`start_export`), the first chunks already
while it is written (`queue_outputs`, the job still processing); a processing job that does not
finish withdraws its pending exports.

Job completion has one owner: every transition to done or failed goes through `_finish`, inside
the transaction that makes it, and the store's `on_job_finished` listener is called once per
finished job after the commit (the node logs its canonical `series.done` / `series.failed` line
there).
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 3

#: Statements that bring a database of schema N to N + 1 (run in order, in one transaction).
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "ALTER TABLE jobs ADD COLUMN crashes INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE jobs ADD COLUMN not_before REAL",
        "ALTER TABLE jobs ADD COLUMN waiting TEXT",
    ),
    # The transfer syntax of each outbox file, recorded when it is written (NULL: read it from
    # the file when it is sent, as for rows queued by an older version).
    2: ("ALTER TABLE exports ADD COLUMN transfer_syntax TEXT",),
}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS series (
    series_uid     TEXT PRIMARY KEY,
    study_uid      TEXT NOT NULL,
    calling_ae     TEXT NOT NULL,
    state          TEXT NOT NULL,
    revision       INTEGER NOT NULL DEFAULT 0,
    n_instances    INTEGER NOT NULL DEFAULT 0,
    expected_count INTEGER,
    first_received REAL NOT NULL,
    last_received  REAL NOT NULL,
    completed_at   REAL,
    own_output     INTEGER NOT NULL DEFAULT 0,
    header_json    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS series_state ON series(state);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid         TEXT PRIMARY KEY,
    series_uid      TEXT NOT NULL REFERENCES series(series_uid),
    sop_class_uid   TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    path            TEXT NOT NULL,
    size_bytes      INTEGER NOT NULL,
    received_at     REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);
CREATE TABLE IF NOT EXISTS jobs (
    id                 INTEGER PRIMARY KEY AUTOINCREMENT,
    series_uid         TEXT NOT NULL REFERENCES series(series_uid),
    revision           INTEGER NOT NULL,
    kind               TEXT NOT NULL,
    rule               TEXT,
    engine             TEXT,
    destinations       TEXT NOT NULL,
    state              TEXT NOT NULL,
    created_at         REAL NOT NULL,
    updated_at         REAL NOT NULL,
    started_at         REAL,
    finished_at        REAL,
    worker             TEXT,
    process_attempts   INTEGER NOT NULL DEFAULT 0,
    crashes            INTEGER NOT NULL DEFAULT 0,
    not_before         REAL,
    waiting            TEXT,
    derived_series_uid TEXT,
    n_out              INTEGER,
    summary_json       TEXT,
    error              TEXT,
    purged             INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS exports (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id        INTEGER NOT NULL REFERENCES jobs(id),
    destination   TEXT NOT NULL,
    sop_uid       TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    path          TEXT NOT NULL,
    state         TEXT NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    next_attempt  REAL NOT NULL,
    last_error    TEXT,
    sent_at       REAL,
    transfer_syntax TEXT,
    UNIQUE(job_id, destination, sop_uid)
);
CREATE INDEX IF NOT EXISTS exports_due ON exports(destination, state, next_attempt);
"""


class JobState(StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    EXPORTING = "exporting"
    DONE = "done"
    FAILED = "failed"
    SUPERSEDED = "superseded"


class SeriesState(StrEnum):
    RECEIVING = "receiving"
    COMPLETE = "complete"
    DISCARDED = "discarded"


class ExportState(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"


class JobKind(StrEnum):
    STANDARDIZE = "standardize"
    FORWARD = "forward"


@dataclass(frozen=True)
class InstanceRecord:
    sop_uid: str
    series_uid: str
    study_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: Path
    size_bytes: int
    calling_ae: str
    header: Mapping[str, str]
    own_output: bool
    expected_count: int | None


@dataclass(frozen=True)
class SeriesRow:
    series_uid: str
    study_uid: str
    state: SeriesState
    revision: int
    n_instances: int
    expected_count: int | None
    first_received: float
    last_received: float
    own_output: bool
    header: Mapping[str, str]
    calling_ae: str = ""  # the AE title the series' first instance came from


@dataclass(frozen=True)
class JobRow:
    id: int
    series_uid: str
    revision: int
    kind: JobKind
    rule: str | None
    engine: str | None
    destinations: tuple[str, ...]
    state: JobState
    created_at: float
    started_at: float | None
    process_attempts: int
    error: str | None
    crashes: int = 0
    waiting: str | None = None


@dataclass(frozen=True)
class JobFinished:
    """A job reached a terminal state (done or failed): what the canonical line reports."""

    job: JobRow  # the row after the transition
    state: JobState


JobFinishedListener = Callable[[JobFinished], None]


@dataclass(frozen=True)
class ExportTotals:
    """A job's export to one destination once nothing of it is pending (the audit trail's
    DICOM Instances Transferred): SOP Class UID -> instances confirmed and given up."""

    job_id: int
    destination: str
    series_uid: str  # the job's source series
    study_uid: str
    sent: Mapping[str, int]
    dead: Mapping[str, int]
    last_error: str | None
    sample_path: Path  # one of the files sent (its header names the patient and study)


@dataclass(frozen=True)
class ExportRow:
    id: int
    job_id: int
    destination: str
    sop_uid: str
    sop_class_uid: str
    path: Path
    attempts: int
    #: The file's transfer syntax as recorded when it was written; None: not recorded (read it
    #: from the file).
    transfer_syntax: str | None = None


#: Told the destination names that have new exports due (after the commit).
ExportsQueuedListener = Callable[[Sequence[str]], None]


class ReceiveOutcome(StrEnum):
    NEW = "new"
    DUPLICATE = "duplicate"
    REOPENED = "reopened"  # a late instance for a series whose job was already created


class JobStore:
    """Thread-safe access to the node's database (one connection, serialized by a lock).

    SQLite serializes writers anyway; one connection with a lock keeps transactions simple and
    avoids a connection per short-lived association thread.
    """

    def __init__(self, path: Path, on_job_finished: JobFinishedListener | None = None) -> None:
        self.path = path
        self.on_job_finished = on_job_finished
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._read_lock = threading.Lock()
        self._reader: sqlite3.Connection | None = None  # has_instance's, opened on first use
        self._finished_in_tx: list[JobFinished] = []
        self._exports_queued: list[ExportsQueuedListener] = []
        self._conn = sqlite3.connect(
            str(path), timeout=30.0, check_same_thread=False, isolation_level=None
        )
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._create_or_migrate()

    def _create_or_migrate(self) -> None:
        with self._lock:
            has_meta = self._conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'"
            ).fetchone()
            row = (
                self._conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                if has_meta
                else None
            )
            if row is None:
                self._conn.executescript(_SCHEMA)
                self._conn.execute(
                    "INSERT INTO meta(key, value) VALUES('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
                return
            version = int(row["value"])
            if version > SCHEMA_VERSION or (
                version < SCHEMA_VERSION
                and any(v not in _MIGRATIONS for v in range(version, SCHEMA_VERSION))
            ):
                raise RuntimeError(
                    f"{self.path}: database schema {version} is not the schema {SCHEMA_VERSION} "
                    "this version of ltdiff-node uses, and cannot be migrated to it"
                )
            if version == SCHEMA_VERSION:
                return
            with self._tx() as c:
                for v in range(version, SCHEMA_VERSION):
                    for statement in _MIGRATIONS[v]:
                        c.execute(statement)
                c.execute(
                    "UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),)
                )

    def close(self) -> None:
        with self._read_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
        with self._lock:
            self._conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; finished jobs are announced after it commits."""
        with self._lock:
            self._finished_in_tx = []
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                self._finished_in_tx = []
                if self._conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        self._conn.execute("ROLLBACK")
                raise
            finished, self._finished_in_tx = self._finished_in_tx, []
        if self.on_job_finished is not None:
            for event in finished:
                try:
                    self.on_job_finished(event)
                except Exception:  # a listener's failure must not undo a committed transition
                    logging.getLogger(__name__).exception("store.listener_failed")

    def _finish(
        self, c: sqlite3.Connection, job_id: int, state: JobState, error: str | None, now: float
    ) -> None:
        """The one transition to a terminal state (done or failed)."""
        c.execute(
            "UPDATE jobs SET state=?, error=?, updated_at=?, finished_at=?, not_before=NULL, "
            "waiting=NULL WHERE id=?",
            (state.value, None if error is None else error[:2000], now, now, job_id),
        )
        row = c.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        self._finished_in_tx.append(JobFinished(_job(row), state))

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._conn.execute(sql, params).fetchall())

    # ---- reception -------------------------------------------------------------------------

    def has_instance(self, sop_uid: str) -> bool:
        """Whether the instance is recorded (committed). Read on a connection of its own, so an
        association thread does not wait for another's write transaction (its fsync) to check;
        record_instance checks again inside its transaction, which decides."""
        with self._read_lock:
            if self._reader is None:
                self._reader = sqlite3.connect(
                    str(self.path), timeout=30.0, check_same_thread=False, isolation_level=None
                )
            rows = self._reader.execute(
                "SELECT 1 FROM instances WHERE sop_uid=?", (sop_uid,)
            ).fetchall()  # to the end: no read transaction stays open (WAL checkpoints)
        return bool(rows)

    def record_instance(self, rec: InstanceRecord, now: float | None = None) -> ReceiveOutcome:
        """Record a spooled instance; committed durably before the caller answers Success."""
        now = time.time() if now is None else now
        with self._tx() as c:
            if c.execute("SELECT 1 FROM instances WHERE sop_uid=?", (rec.sop_uid,)).fetchone():
                return ReceiveOutcome.DUPLICATE
            series = c.execute(
                "SELECT state FROM series WHERE series_uid=?", (rec.series_uid,)
            ).fetchone()
            outcome = ReceiveOutcome.NEW
            if series is None:
                c.execute(
                    "INSERT INTO series(series_uid, study_uid, calling_ae, state, n_instances, "
                    "expected_count, first_received, last_received, own_output, header_json) "
                    "VALUES(?,?,?,?,0,?,?,?,?,?)",
                    (
                        rec.series_uid,
                        rec.study_uid,
                        rec.calling_ae,
                        SeriesState.RECEIVING.value,
                        rec.expected_count,
                        now,
                        now,
                        int(rec.own_output),
                        json.dumps(dict(rec.header), sort_keys=True),
                    ),
                )
            elif series["state"] != SeriesState.RECEIVING.value:
                # Late instance: reopen the series. A job that has not started yet is superseded
                # by the next revision; one already running finishes and the new revision
                # reprocesses the whole series (derived UIDs are deterministic, so the PACS
                # receives the same UIDs again plus the new images).
                outcome = ReceiveOutcome.REOPENED
                c.execute(
                    "UPDATE series SET state=?, revision=revision+1, completed_at=NULL "
                    "WHERE series_uid=?",
                    (SeriesState.RECEIVING.value, rec.series_uid),
                )
                c.execute(
                    "UPDATE jobs SET state=?, updated_at=?, error=? WHERE series_uid=? AND state=?",
                    (
                        JobState.SUPERSEDED.value,
                        now,
                        "superseded: late instance reopened the series",
                        rec.series_uid,
                        JobState.QUEUED.value,
                    ),
                )
            c.execute(
                "INSERT INTO instances(sop_uid, series_uid, sop_class_uid, transfer_syntax, path, "
                "size_bytes, received_at) VALUES(?,?,?,?,?,?,?)",
                (
                    rec.sop_uid,
                    rec.series_uid,
                    rec.sop_class_uid,
                    rec.transfer_syntax,
                    str(rec.path),
                    rec.size_bytes,
                    now,
                ),
            )
            c.execute(
                "UPDATE series SET n_instances=n_instances+1, last_received=?, "
                "expected_count=COALESCE(?, expected_count) WHERE series_uid=?",
                (now, rec.expected_count, rec.series_uid),
            )
            return outcome

    # ---- assembly --------------------------------------------------------------------------

    def receiving_series(self) -> list[SeriesRow]:
        rows = self._query("SELECT * FROM series WHERE state=?", (SeriesState.RECEIVING.value,))
        return [_series(r) for r in rows]

    def series(self, series_uid: str) -> SeriesRow | None:
        rows = self._query("SELECT * FROM series WHERE series_uid=?", (series_uid,))
        return _series(rows[0]) if rows else None

    def instance_paths(self) -> list[str]:
        """Every spooled file a record points to (for the start-up sweep)."""
        return [str(r["path"]) for r in self._query("SELECT path FROM instances")]

    def instances(self, series_uid: str) -> list[tuple[str, str, Path]]:
        rows = self._query(
            "SELECT sop_uid, sop_class_uid, path FROM instances WHERE series_uid=? "
            "ORDER BY sop_uid",
            (series_uid,),
        )
        return [(r["sop_uid"], r["sop_class_uid"], Path(r["path"])) for r in rows]

    def transfer_syntaxes(self, series_uid: str) -> dict[str, str]:
        """SOP Instance UID -> transfer syntax of the series' stored instances."""
        rows = self._query(
            "SELECT sop_uid, transfer_syntax FROM instances WHERE series_uid=?", (series_uid,)
        )
        return {r["sop_uid"]: r["transfer_syntax"] for r in rows}

    def complete_series(
        self,
        series_uid: str,
        revision: int,
        *,
        job_kind: JobKind | None,
        rule: str | None,
        engine: str | None,
        destinations: tuple[str, ...],
        now: float | None = None,
    ) -> int | None:
        """Close a series revision and create its job (None: discard). Returns the job id.

        Does nothing (returns None) if the series changed revision meanwhile.
        """
        now = time.time() if now is None else now
        with self._tx() as c:
            cur = c.execute(
                "UPDATE series SET state=?, completed_at=? "
                "WHERE series_uid=? AND revision=? AND state=?",
                (
                    (SeriesState.COMPLETE if job_kind else SeriesState.DISCARDED).value,
                    now,
                    series_uid,
                    revision,
                    SeriesState.RECEIVING.value,
                ),
            )
            if cur.rowcount != 1 or job_kind is None:
                return None
            cur = c.execute(
                "INSERT INTO jobs(series_uid, revision, kind, rule, engine, destinations, state, "
                "created_at, updated_at) VALUES(?,?,?,?,?,?,?,?,?)",
                (
                    series_uid,
                    revision,
                    job_kind.value,
                    rule,
                    engine,
                    json.dumps(list(destinations)),
                    JobState.QUEUED.value,
                    now,
                    now,
                ),
            )
            return int(cur.lastrowid or 0)

    # ---- jobs ------------------------------------------------------------------------------

    def claim_job(
        self, worker: str, kinds: tuple[JobKind, ...], now: float | None = None
    ) -> JobRow | None:
        """Atomically move the oldest queued job of the given kinds to processing."""
        now = time.time() if now is None else now
        marks = ",".join("?" for _ in kinds)
        with self._tx() as c:
            row = c.execute(
                f"SELECT * FROM jobs WHERE state=? AND kind IN ({marks}) "
                "AND (not_before IS NULL OR not_before<=?) ORDER BY id LIMIT 1",
                (JobState.QUEUED.value, *[k.value for k in kinds], now),
            ).fetchone()
            if row is None:
                return None
            c.execute(
                "UPDATE jobs SET state=?, worker=?, started_at=?, updated_at=?, "
                "process_attempts=process_attempts+1, not_before=NULL, waiting=NULL WHERE id=?",
                (JobState.PROCESSING.value, worker, now, now, row["id"]),
            )
            row = c.execute("SELECT * FROM jobs WHERE id=?", (row["id"],)).fetchone()
            return _job(row)

    def job(self, job_id: int) -> JobRow | None:
        rows = self._query("SELECT * FROM jobs WHERE id=?", (job_id,))
        return _job(rows[0]) if rows else None

    def start_export(
        self,
        job_id: int,
        outputs: list[tuple[str, str, Path]],
        destinations: tuple[str, ...],
        *,
        derived_series_uid: str | None,
        summary: Mapping[str, Any],
        transfer_syntaxes: Mapping[str, str] | None = None,
        now: float | None = None,
    ) -> JobState:
        """Record a processed job's output files and queue them per destination.

        `transfer_syntaxes`: SOP Instance UID -> the transfer syntax its file was written in, so
        that the exporter sends the file's bytes without reading its header first. The
        destinations' exporters are told after the commit (`on_exports_queued`)."""
        now = time.time() if now is None else now
        state = JobState.EXPORTING if destinations and outputs else JobState.DONE
        syntaxes = transfer_syntaxes or {}
        with self._tx() as c:
            _insert_exports(c, job_id, destinations, outputs, syntaxes, now)
            c.execute(
                "UPDATE jobs SET state=?, updated_at=?, derived_series_uid=?, n_out=?, "
                "summary_json=?, error=NULL WHERE id=?",
                (
                    JobState.EXPORTING.value,
                    now,
                    derived_series_uid,
                    len(outputs),
                    json.dumps(dict(summary), sort_keys=True),
                    job_id,
                ),
            )
            if state is JobState.DONE:
                self._finish(c, job_id, JobState.DONE, None, now)
        if state is JobState.EXPORTING:
            self._announce_exports(destinations)
        return state

    def queue_outputs(
        self,
        job_id: int,
        outputs: Sequence[tuple[str, str, Path]],
        destinations: Sequence[str],
        *,
        transfer_syntaxes: Mapping[str, str] | None = None,
        now: float | None = None,
    ) -> bool:
        """Queue the export of output files a job still processing has already written, so the
        exporter sends them while the rest is written; `start_export` queues the rest and moves
        the job on. Does nothing (False) unless the job is processing. If the job then does not
        finish (crash, failure, stop), its pending exports are withdrawn (`_withdraw_exports`)
        and what the destination confirmed stays sent."""
        now = time.time() if now is None else now
        syntaxes = transfer_syntaxes or {}
        with self._tx() as c:
            row = c.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None or row["state"] != JobState.PROCESSING.value:
                return False
            _insert_exports(c, job_id, destinations, outputs, syntaxes, now)
        if destinations and outputs:
            self._announce_exports(destinations)
        return True

    @staticmethod
    def _withdraw_exports(c: sqlite3.Connection, job_id: int) -> None:
        """A processing job that does not finish now: the exports of output it had already
        written (`queue_outputs`) and that are still pending are withdrawn; a rerun queues its
        output again, and instances the destination confirmed stay sent (the rerun writes the
        same UIDs)."""
        c.execute(
            "DELETE FROM exports WHERE job_id=? AND state=?",
            (job_id, ExportState.PENDING.value),
        )

    def on_exports_queued(self, listener: ExportsQueuedListener) -> None:
        """Call `listener(destination names)` whenever a job's output is queued for export,
        after the commit: an exporter waits on this
        rather than on its idle poll. (`retry_job` runs in the CLI's process: the exporter
        finds those on its next poll.)"""
        self._exports_queued.append(listener)

    def _announce_exports(self, destinations: Sequence[str]) -> None:
        for listener in self._exports_queued:
            try:
                listener(destinations)
            except Exception:  # a listener's failure must not undo a committed transition
                logging.getLogger(__name__).exception("store.listener_failed")

    def fail_job(
        self,
        job_id: int,
        error: str,
        now: float | None = None,
        *,
        summary: Mapping[str, Any] | None = None,
    ) -> None:
        """Fail a job; `summary` (what was found before it failed, e.g. the envelope check)
        replaces the job's summary for the canonical line."""
        now = time.time() if now is None else now
        with self._tx() as c:
            self._withdraw_exports(c, job_id)
            if summary:
                c.execute(
                    "UPDATE jobs SET summary_json=? WHERE id=?",
                    (json.dumps(dict(summary), sort_keys=True), job_id),
                )
            self._finish(c, job_id, JobState.FAILED, error, now)

    def _count_crash(
        self, c: sqlite3.Connection, job_id: int, reason: str, max_attempts: int, now: float
    ) -> JobState:
        self._withdraw_exports(c, job_id)
        row = c.execute("SELECT crashes FROM jobs WHERE id=?", (job_id,)).fetchone()
        crashes = int(row["crashes"]) + 1
        c.execute("UPDATE jobs SET crashes=? WHERE id=?", (crashes, job_id))
        if crashes >= max_attempts:
            self._finish(
                c,
                job_id,
                JobState.FAILED,
                f"{reason}; given up after {crashes} attempt(s) "
                "(jobs.max_attempts): `ltdiff-node retry` runs it again",
                now,
            )
            return JobState.FAILED
        c.execute(
            "UPDATE jobs SET state=?, worker=NULL, updated_at=?, error=? WHERE id=?",
            (JobState.QUEUED.value, now, f"{reason} (attempt {crashes} of {max_attempts})", job_id),
        )
        return JobState.QUEUED

    def record_crash(
        self, job_id: int, reason: str, *, max_attempts: int, now: float | None = None
    ) -> JobState:
        """The job's engine process died (killed for memory, timed out, crashed): queue the job
        again, or fail it once it has taken its engine down `max_attempts` times."""
        now = time.time() if now is None else now
        with self._tx() as c:
            return self._count_crash(c, job_id, reason, max_attempts, now)

    def requeue_interrupted(
        self, max_attempts: int, now: float | None = None
    ) -> dict[int, JobState]:
        """At start-up: jobs still `processing` were interrupted by a crash or kill of the node.
        Each counts as an attempt: queued again, or failed after `max_attempts`, so that a job
        that takes the whole node down cannot do so on every restart. Returns job id -> state."""
        now = time.time() if now is None else now
        with self._tx() as c:
            ids = [
                int(r["id"])
                for r in c.execute(
                    "SELECT id FROM jobs WHERE state=? ORDER BY id", (JobState.PROCESSING.value,)
                ).fetchall()
            ]
            return {
                job_id: self._count_crash(
                    c, job_id, "the node stopped abnormally while processing", max_attempts, now
                )
                for job_id in ids
            }

    def release_job(self, job_id: int, now: float | None = None) -> None:
        """A clean stop interrupted the job: queue it again without counting an attempt."""
        now = time.time() if now is None else now
        with self._tx() as c:
            released = c.execute(
                "UPDATE jobs SET state=?, worker=NULL, updated_at=? WHERE id=? AND state=?",
                (JobState.QUEUED.value, now, job_id, JobState.PROCESSING.value),
            ).rowcount
            if released:
                self._withdraw_exports(c, job_id)

    def defer_job(
        self, job_id: int, reason: str, not_before: float, now: float | None = None
    ) -> None:
        """The job cannot run now (the disk is full): queue it again, not claimed before
        `not_before`, with the reason shown by `status`."""
        now = time.time() if now is None else now
        with self._tx() as c:
            self._withdraw_exports(c, job_id)
            c.execute(
                "UPDATE jobs SET state=?, worker=NULL, updated_at=?, not_before=?, waiting=? "
                "WHERE id=?",
                (JobState.QUEUED.value, now, not_before, reason[:500], job_id),
            )

    def retry_job(self, job_id: int, now: float | None = None) -> str:
        """Operator retry: dead exports become pending again; a job failed in processing is
        queued again. Returns what was done, for the CLI."""
        now = time.time() if now is None else now
        with self._tx() as c:
            row = c.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                raise KeyError(job_id)
            dead = c.execute(
                "UPDATE exports SET state=?, attempts=0, next_attempt=?, last_error=NULL "
                "WHERE job_id=? AND state=?",
                (ExportState.PENDING.value, now, job_id, ExportState.DEAD.value),
            ).rowcount
            if dead:
                c.execute(
                    "UPDATE jobs SET state=?, error=NULL, updated_at=?, finished_at=NULL "
                    "WHERE id=?",
                    (JobState.EXPORTING.value, now, job_id),
                )
                return f"job {job_id}: {dead} dead-letter instance(s) queued for export again"
            if row["state"] == JobState.FAILED.value:
                c.execute(
                    "UPDATE jobs SET state=?, error=NULL, updated_at=?, finished_at=NULL, "
                    "crashes=0, not_before=NULL, waiting=NULL WHERE id=?",
                    (JobState.QUEUED.value, now, job_id),
                )
                return f"job {job_id}: queued for processing again"
            return f"job {job_id} is {row['state']}: nothing to retry"

    # ---- exports ---------------------------------------------------------------------------

    def due_exports(self, destination: str, now: float, limit: int = 1000) -> list[ExportRow]:
        rows = self._query(
            "SELECT * FROM exports WHERE destination=? AND state=? AND next_attempt<=? "
            "ORDER BY job_id, id LIMIT ?",
            (destination, ExportState.PENDING.value, now, limit),
        )
        return [
            ExportRow(
                r["id"],
                r["job_id"],
                r["destination"],
                r["sop_uid"],
                r["sop_class_uid"],
                Path(r["path"]),
                r["attempts"],
                r["transfer_syntax"],
            )
            for r in rows
        ]

    def next_export_time(self, destination: str) -> float | None:
        rows = self._query(
            "SELECT MIN(next_attempt) AS t FROM exports WHERE destination=? AND state=?",
            (destination, ExportState.PENDING.value),
        )
        return None if rows[0]["t"] is None else float(rows[0]["t"])

    def mark_sent(self, export_ids: list[int], now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._tx() as c:
            c.executemany(
                "UPDATE exports SET state=?, sent_at=?, last_error=NULL WHERE id=?",
                [(ExportState.SENT.value, now, i) for i in export_ids],
            )

    def mark_export_failed(
        self, rows: list[ExportRow], error: str, *, max_attempts: int, backoff: Any, now: float
    ) -> int:
        """Count a failed attempt; schedule the next with backoff or move to dead letter.

        `backoff(attempts) -> seconds`. Returns the number of exports that became dead letters.
        """
        dead = 0
        with self._tx() as c:
            for r in rows:
                attempts = r.attempts + 1
                if attempts >= max_attempts:
                    dead += 1
                    c.execute(
                        "UPDATE exports SET state=?, attempts=?, last_error=? WHERE id=?",
                        (ExportState.DEAD.value, attempts, error[:500], r.id),
                    )
                else:
                    c.execute(
                        "UPDATE exports SET attempts=?, next_attempt=?, last_error=? WHERE id=?",
                        (attempts, now + float(backoff(attempts)), error[:500], r.id),
                    )
        return dead

    def export_totals(self, job_id: int, destination: str) -> ExportTotals | None:
        """What a job's export to `destination` came to; None while an instance is pending."""
        rows = self._query(
            "SELECT e.state, e.sop_class_uid, COUNT(*) AS n, MIN(e.path) AS path, "
            "MAX(e.last_error) AS last_error, j.series_uid, s.study_uid FROM exports e "
            "JOIN jobs j ON j.id=e.job_id JOIN series s ON s.series_uid=j.series_uid "
            "WHERE e.job_id=? AND e.destination=? GROUP BY e.state, e.sop_class_uid",
            (job_id, destination),
        )
        if not rows or any(r["state"] == ExportState.PENDING.value for r in rows):
            return None
        job = self._query("SELECT state FROM jobs WHERE id=?", (job_id,))
        if job and job[0]["state"] == JobState.PROCESSING.value:
            return None  # the output is still being written (queue_outputs): not the total
        sent = {r["sop_class_uid"]: r["n"] for r in rows if r["state"] == ExportState.SENT.value}
        dead = [r for r in rows if r["state"] == ExportState.DEAD.value]
        return ExportTotals(
            job_id=job_id,
            destination=destination,
            series_uid=rows[0]["series_uid"],
            study_uid=rows[0]["study_uid"],
            sent=sent,
            dead={r["sop_class_uid"]: r["n"] for r in dead},
            last_error=max((r["last_error"] for r in dead if r["last_error"]), default=None),
            sample_path=Path(min(r["path"] for r in rows)),
        )

    def settle_exporting_jobs(self, now: float | None = None) -> list[tuple[int, JobState]]:
        """Jobs whose exports are all settled become done (all sent) or failed (dead letters)."""
        now = time.time() if now is None else now
        settled: list[tuple[int, JobState]] = []
        with self._tx() as c:
            rows = c.execute(
                "SELECT j.*, "
                "SUM(e.state='pending') AS pending, SUM(e.state='dead') AS dead "
                "FROM jobs j JOIN exports e ON e.job_id=j.id WHERE j.state=? GROUP BY j.id",
                (JobState.EXPORTING.value,),
            ).fetchall()
            for r in rows:
                if r["pending"]:
                    continue
                new = JobState.FAILED if r["dead"] else JobState.DONE
                err = (
                    f"dead letter: {r['dead']} instance(s) could not be delivered"
                    if r["dead"]
                    else None
                )
                self._finish(c, int(r["id"]), new, err, now)
                settled.append((int(r["id"]), new))
        return settled

    # ---- retention -------------------------------------------------------------------------

    def purgeable(self, older_than: float) -> tuple[list[str], list[int]]:
        """Discarded series and done jobs finished before `older_than` whose files can go."""
        series = self._query(
            "SELECT series_uid FROM series WHERE state=? AND completed_at<?",
            (SeriesState.DISCARDED.value, older_than),
        )
        jobs = self._query(
            "SELECT id FROM jobs WHERE state=? AND finished_at<? AND purged=0",
            (JobState.DONE.value, older_than),
        )
        return [r["series_uid"] for r in series], [r["id"] for r in jobs]

    def forget_series(self, series_uid: str) -> None:
        with self._tx() as c:
            c.execute("DELETE FROM instances WHERE series_uid=?", (series_uid,))
            c.execute(
                "DELETE FROM series WHERE series_uid=? AND state=?",
                (series_uid, SeriesState.DISCARDED.value),
            )

    def mark_purged(self, job_id: int) -> str | None:
        """Mark a done job's files purged. If its series is complete and has no other open job,
        forget the series' instances too and return its UID (the caller removes the spool)."""
        with self._tx() as c:
            c.execute("UPDATE jobs SET purged=1 WHERE id=?", (job_id,))
            row = c.execute(
                "SELECT j.series_uid FROM jobs j JOIN series s USING(series_uid) WHERE j.id=? "
                "AND s.state=? AND NOT EXISTS (SELECT 1 FROM jobs o "
                "WHERE o.series_uid=j.series_uid "
                "AND o.state IN (?,?,?))",
                (
                    job_id,
                    SeriesState.COMPLETE.value,
                    JobState.QUEUED.value,
                    JobState.PROCESSING.value,
                    JobState.EXPORTING.value,
                ),
            ).fetchone()
            if row is None:
                return None
            c.execute("DELETE FROM instances WHERE series_uid=?", (row["series_uid"],))
            return str(row["series_uid"])

    def job_outcome(self, job_id: int) -> dict[str, Any]:
        rows = self._query(
            "SELECT summary_json, created_at, finished_at, derived_series_uid, error "
            "FROM jobs WHERE id=?",
            (job_id,),
        )
        r = rows[0]
        return {
            "summary": json.loads(r["summary_json"] or "{}"),
            "created_at": r["created_at"],
            "finished_at": r["finished_at"],
            "derived_series_uid": r["derived_series_uid"],
            "error": r["error"],
        }

    # ---- reporting -------------------------------------------------------------------------

    def status_report(self, limit: int = 20) -> dict[str, Any]:
        """Counts and recent jobs for `ltdiff-node status` (no PHI: UIDs and states only)."""
        jobs_by_state = {
            r["state"]: r["n"]
            for r in self._query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        }
        series_by_state = {
            r["state"]: r["n"]
            for r in self._query("SELECT state, COUNT(*) AS n FROM series GROUP BY state")
        }
        exports = {
            f"{r['destination']}:{r['state']}": r["n"]
            for r in self._query(
                "SELECT destination, state, COUNT(*) AS n FROM exports GROUP BY destination, state"
            )
        }
        retrying = [
            dict(r)
            for r in self._query(
                "SELECT job_id, destination, COUNT(*) AS instances, MAX(attempts) AS attempts, "
                "MIN(next_attempt) AS next_attempt, MAX(last_error) AS last_error FROM exports "
                "WHERE state='pending' AND attempts>0 GROUP BY job_id, destination"
            )
        ]
        dead = [
            dict(r)
            for r in self._query(
                "SELECT job_id, destination, COUNT(*) AS instances, MAX(last_error) AS last_error "
                "FROM exports WHERE state='dead' GROUP BY job_id, destination"
            )
        ]
        waiting = [
            dict(r)
            for r in self._query(
                "SELECT id AS job_id, waiting AS reason, not_before AS next_attempt "
                "FROM jobs WHERE state=? AND waiting IS NOT NULL ORDER BY id",
                (JobState.QUEUED.value,),
            )
        ]
        recent = [
            dict(r)
            for r in self._query(
                "SELECT j.id, j.kind, j.state, j.rule, j.engine, j.series_uid, j.revision, "
                "j.derived_series_uid, j.n_out, j.created_at, j.finished_at, j.error, "
                "j.process_attempts, j.crashes, s.n_instances "
                "FROM jobs j JOIN series s USING(series_uid) "
                "ORDER BY j.id DESC LIMIT ?",
                (limit,),
            )
        ]
        return {
            "series": series_by_state,
            "jobs": jobs_by_state,
            "exports": exports,
            "retrying": retrying,
            "dead_letters": dead,
            "waiting": waiting,
            "recent_jobs": recent,
        }


@dataclass(frozen=True)
class QueueGauges:
    """What the database says about the node's backlog now (for the metrics endpoint)."""

    jobs: Mapping[str, int]  # JobState value -> jobs; queued ones deferred for disk as "waiting"
    oldest_queued_at: float | None  # created_at of the oldest queued (or waiting) job
    dead_letters: Mapping[str, int]  # destination -> instances given up (ExportState.DEAD)
    retrying: Mapping[str, int]  # destination -> pending instances with a failed attempt


#: The job "state" the metrics show for a queued job deferred until the disk has room.
WAITING = "waiting"


def _read_only(path: Path, timeout_s: float) -> sqlite3.Connection:
    """A read-only connection of its own: in WAL mode a reader neither waits for the node's
    writers nor blocks them, and it takes no lock of the JobStore."""
    if not path.is_file():
        raise sqlite3.OperationalError(f"no database file at {path}")
    conn = sqlite3.connect(
        f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=timeout_s, check_same_thread=False
    )
    conn.row_factory = sqlite3.Row
    return conn


def check_database(path: Path, timeout_s: float = 5.0) -> None:
    """Raise sqlite3.Error unless the database file opens and its schema can be read."""
    with contextlib.closing(_read_only(path, timeout_s)) as conn:
        conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()


def read_queue_gauges(
    path: Path, destinations: Sequence[str], timeout_s: float = 5.0
) -> QueueGauges:
    """Job counts by state, the oldest queued job and the export backlog, read-only.

    Bounded cost: every query is answered from an index (jobs_state; exports_due by its
    destination and state prefix, one lookup per configured destination), so a scrape reads the
    queued, pending and dead rows, and counts the finished jobs in the index only. Every state
    is reported, 0 when no job has it. Raises sqlite3.Error when the database cannot be read.
    """
    with contextlib.closing(_read_only(path, timeout_s)) as conn:
        jobs = {s.value: 0 for s in JobState} | {WAITING: 0}
        for r in conn.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"):
            jobs[r["state"]] = int(r["n"])
        queued = conn.execute(
            "SELECT MIN(created_at) AS oldest, SUM(waiting IS NOT NULL) AS waiting FROM jobs "
            "WHERE state=?",
            (JobState.QUEUED.value,),
        ).fetchone()
        jobs[WAITING] = int(queued["waiting"] or 0)
        jobs[JobState.QUEUED.value] -= jobs[WAITING]
        dead: dict[str, int] = {}
        retrying: dict[str, int] = {}
        for dest in destinations:
            dead[dest] = int(
                conn.execute(
                    "SELECT COUNT(*) FROM exports WHERE destination=? AND state=?",
                    (dest, ExportState.DEAD.value),
                ).fetchone()[0]
            )
            retrying[dest] = int(
                conn.execute(
                    "SELECT COUNT(*) FROM exports WHERE destination=? AND state=? AND attempts>0",
                    (dest, ExportState.PENDING.value),
                ).fetchone()[0]
            )
    oldest = queued["oldest"]
    return QueueGauges(jobs, None if oldest is None else float(oldest), dead, retrying)


def _series(r: sqlite3.Row) -> SeriesRow:
    return SeriesRow(
        series_uid=r["series_uid"],
        study_uid=r["study_uid"],
        state=SeriesState(r["state"]),
        revision=r["revision"],
        n_instances=r["n_instances"],
        expected_count=r["expected_count"],
        first_received=r["first_received"],
        last_received=r["last_received"],
        own_output=bool(r["own_output"]),
        header=json.loads(r["header_json"]),
        calling_ae=r["calling_ae"],
    )


def _job(r: sqlite3.Row) -> JobRow:
    return JobRow(
        id=r["id"],
        series_uid=r["series_uid"],
        revision=r["revision"],
        kind=JobKind(r["kind"]),
        rule=r["rule"],
        engine=r["engine"],
        destinations=tuple(json.loads(r["destinations"])),
        state=JobState(r["state"]),
        created_at=r["created_at"],
        started_at=r["started_at"],
        process_attempts=r["process_attempts"],
        error=r["error"],
        crashes=r["crashes"],
        waiting=r["waiting"],
    )


def _insert_exports(  # noqa: PLR0917 - one row per (destination, output), all positional here
    c: sqlite3.Connection,
    job_id: int,
    destinations: Sequence[str],
    outputs: Sequence[tuple[str, str, Path]],
    syntaxes: Mapping[str, str],
    now: float,
) -> None:
    """Queue a job's outputs (SOP Instance UID, SOP Class UID, path) for each destination, in
    the caller's transaction; an export already queued is left as it is."""
    for dest in destinations:
        c.executemany(
            "INSERT OR IGNORE INTO exports(job_id, destination, sop_uid, sop_class_uid, "
            "path, state, next_attempt, transfer_syntax) VALUES(?,?,?,?,?,?,?,?)",
            [
                (job_id, dest, sop, cls, str(p), ExportState.PENDING.value, now, syntaxes.get(sop))
                for sop, cls, p in outputs
            ],
        )
