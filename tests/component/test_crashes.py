"""The node process killed for real (kill -9, as the kernel's OOM killer or a power cut would):
issue 8 defect 1, "the node dies again on every restart and every later job starves"."""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path

import pytest
from tests_support import (
    free_port,
    log_events,
    process_gone,
    serve,
    wait_until,
    write_series,
    write_site_config,
)

from dicom_node.config import DestinationConfig
from dicom_node.export import send_paths

pytestmark = pytest.mark.slow


def _job_states(db: Path) -> list[tuple[int, str, int]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return list(con.execute("SELECT id, state, crashes FROM jobs ORDER BY id"))
    finally:
        con.close()


def _engine_pid(log: Path) -> int:
    return int(
        next(e for e in reversed(log_events(log)) if e["event"] == "engine_process.started")["pid"]
    )  # type: ignore[arg-type]


def test_a_job_that_keeps_killing_the_node_fails_at_start_up_and_later_jobs_run(tmp_path):
    port = free_port()
    state = tmp_path / "state"
    config = write_site_config(tmp_path / "site.toml", state, port, "[jobs]\nmax_attempts = 2")
    log = tmp_path / "node.log"
    series = write_series(tmp_path / "big", n_slices=100, size=512, uid_seed="node-killer")
    proc = serve(config, log)
    to_node = DestinationConfig("node", "LTDIFF", "127.0.0.1", port)
    try:
        assert not send_paths(to_node, "PACS", series).failed
        for kill in (1, 2):
            wait_until(
                lambda: any(
                    s == "processing" for _, s, _ in _job_states(state / "ltdiff-node.sqlite3")
                ),
                120,
                f"the job processing before kill {kill}",
            )
            engine_pid = _engine_pid(log)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            wait_until(
                lambda pid=engine_pid: process_gone(pid),
                30,
                "the engine process to die with the node",
            )
            proc = serve(config, log)
        ((job_id, job_state, crashes),) = _job_states(state / "ltdiff-node.sqlite3")
        assert (job_state, crashes) == ("failed", 2), "failed at the second start, not run again"
        failed_lines = [e for e in log_events(log) if e["event"] == "series.failed"]
        assert [e["job"] for e in failed_lines] == [job_id], "one canonical line"
        assert "stopped abnormally while processing" in str(failed_lines[0]["error"])
        small = write_series(tmp_path / "small", n_slices=3, size=64, uid_seed="after-killer")
        assert not send_paths(to_node, "PACS", small).failed
        wait_until(
            lambda: (
                [s for _, s, _ in _job_states(state / "ltdiff-node.sqlite3")] == ["failed", "done"]
            ),
            60,
            "the later series to be processed",
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == 0
