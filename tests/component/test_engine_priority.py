"""Engine processes run below the node's CPU priority (jobs.engine_nice), so that reception is
served first when both want the cores."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from dicom_node.demo import loopback_config
from dicom_node.engine_host import (
    NUMPY_HUGEPAGE_VARIABLE,
    EngineProcess,
    engine_process_environment,
)


@pytest.mark.parametrize("engine_nice", [10, 0])
def test_engine_process_niceness_is_the_nodes_plus_engine_nice(
    tmp_path: Path, engine_nice: int
) -> None:
    config = loopback_config(tmp_path / "state", None, stable_age_s=1.0)
    config = dataclasses.replace(
        config, jobs=dataclasses.replace(config.jobs, engine_nice=engine_nice)
    )
    process = EngineProcess(config, "cpu", "priority-test")
    try:
        process.start(timeout_s=300.0)
        assert process.pid is not None
        node = os.getpriority(os.PRIO_PROCESS, 0)
        assert os.getpriority(os.PRIO_PROCESS, process.pid) == min(19, node + engine_nice)
    finally:
        process.close()


def test_engine_processes_get_numpy_arrays_on_small_pages(tmp_path: Path) -> None:
    """numpy's huge pages made the first touch of a job's volume stall for up to 1.7 s on the
    development machine (benchmarks/bench_first_touch.py); the engine processes start with
    NUMPY_MADVISE_HUGEPAGE=0 in their environment (read by numpy when the fork server imports
    it)."""
    expected = os.environ.get(NUMPY_HUGEPAGE_VARIABLE) or "0"  # a site's own setting wins
    config = loopback_config(tmp_path / "state", None, stable_age_s=1.0)
    process = EngineProcess(config, "cpu", "pages-test")
    try:
        process.start(timeout_s=300.0)
        assert process.pid is not None
        environ = Path(f"/proc/{process.pid}/environ").read_bytes().split(b"\0")
        assert f"{NUMPY_HUGEPAGE_VARIABLE}={expected}".encode() in environ
    finally:
        process.close()


@pytest.mark.parametrize(("given", "expected"), [(None, "0"), ("1", "1"), ("0", "0")])
def test_the_small_pages_default_gives_way_to_the_sites_own_setting(
    monkeypatch: pytest.MonkeyPatch, given: str | None, expected: str
) -> None:
    if given is None:
        monkeypatch.delenv(NUMPY_HUGEPAGE_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(NUMPY_HUGEPAGE_VARIABLE, given)
    engine_process_environment()
    assert os.environ[NUMPY_HUGEPAGE_VARIABLE] == expected
