"""Running a benchmark script as the interop smoke tests do: in a subprocess, its work folder
under the test's tmp_path, its stdout returned once it exited 0."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from peer_support import orthanc_executable
from tests_support import REQUIRE_PEERS

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """A benchmark script as a module, to test its pure parts (benchmarks/ is not a package;
    its scripts import each other, as when run as scripts)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def require_orthanc() -> None:
    """Skip without Orthanc; under CI, where `make test` installs it, fail instead."""
    if orthanc_executable() is None:
        if REQUIRE_PEERS:
            pytest.fail("Orthanc is not installed")
        pytest.skip("Orthanc is not installed")


def run_benchmark(script: str, args: list[str], work: Path, timeout: float = 900) -> str:
    """Run benchmarks/`script` with `args`, TMPDIR = `work` (its work folder, which the script
    removes at the end); assert it exited 0 and return its stdout."""
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TMPDIR": str(work)},
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    return proc.stdout
