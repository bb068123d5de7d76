"""Engine processes run below the node's CPU priority (jobs.engine_nice), so that reception is
served first when both want the cores."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from dicom_node.demo import loopback_config
from dicom_node.engine_host import EngineProcess


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
