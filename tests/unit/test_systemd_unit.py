"""The shipped systemd unit parses and keeps the properties the README promises."""

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "ltdiff-node.service"


def _service_section() -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    section = None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def test_unit_runs_hardened_as_dedicated_user_with_state_directory_and_gpu_access():
    svc = _service_section()
    assert svc["Type"] == ["notify"]
    assert svc["User"] == ["ltdiff-node"]
    assert svc["StateDirectory"] == ["ltdiff-node"]
    assert svc["Restart"] == ["on-failure"]
    assert svc["RestartPreventExitStatus"] == ["78"], "a config error must not restart-loop"
    assert svc["NoNewPrivileges"] == ["yes"] and svc["ProtectSystem"] == ["strict"]
    assert svc["PrivateDevices"] == ["no"], "PrivateDevices=yes would hide the GPU"
    assert "char-nvidia* rw" in svc["DeviceAllow"]
    assert any("ltdiff-node serve" in v for v in svc["ExecStart"])


def test_unit_bounds_memory_and_survives_an_engine_process_killed_for_it():
    """Issue 8 defect 1: a job must not take the node down; the unit caps memory, and a kill of
    the engine process at the cap is handled by the node, not by stopping the service."""
    svc = _service_section()
    (memory_max,) = svc["MemoryMax"]
    assert memory_max.endswith("G") and int(memory_max[:-1]) >= 8 + 4, (
        "above one worker's jobs.memory_max_mb (8 GB) plus room for reception"
    )
    assert svc["OOMPolicy"] == ["continue"]


def test_unit_passes_systemd_analyze_verify(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed")
    # Point the unit at an executable that exists here; everything else is verified as shipped.
    text = UNIT.read_text().replace("/opt/ltdiff-node/.venv/bin/ltdiff-node", sys.executable)
    unit = tmp_path / "ltdiff-node.service"
    unit.write_text(text)
    result = subprocess.run(
        [tool, "verify", str(unit)], check=False, capture_output=True, text=True, timeout=60
    )
    problems = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if "ltdiff-node.service" in line
    ]
    assert not problems, "\n".join(problems)


def test_unit_file_is_ini_parseable():
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.read_string(UNIT.read_text())
    assert {"Unit", "Service", "Install"} <= set(parser.sections())
