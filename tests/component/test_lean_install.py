"""The node installed without the `evaluate` extra (pyradiomics, SimpleITK, matplotlib), as a
hospital installs it: every module of the node's packages imports, `check-config`, `bars` and
`serve` run, and `evaluate` says how to install the extra instead of failing with a traceback.

Each test runs Python processes in which the three packages cannot be imported: a
`sitecustomize` put first on PYTHONPATH installs a `sys.meta_path` finder that refuses them and
records every attempt in a file, so a test also sees attempts that something caught. Processes
the node starts (the fork server, the engine processes) inherit the environment and the finder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tests_support import free_port, log_events, serve, wait_until, write_series, write_site_config

from dicom_node.config import DestinationConfig
from dicom_node.export import send_paths

EXTRA_MODULES = ("radiomics", "SimpleITK", "matplotlib")
EXIT_UNAVAILABLE = 69

SITECUSTOMIZE = f"""
import os
import sys

_BLOCKED = {EXTRA_MODULES!r}
_RECORD = os.environ["LEAN_INSTALL_RECORD"]


def _record(line):
    with open(_RECORD, "a", encoding="utf-8") as f:
        f.write(line + "\\n")


class _WithoutTheEvaluateExtra:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _BLOCKED:
            _record("blocked " + name)
            raise ModuleNotFoundError(f"No module named {{name!r}} (lean install)", name=name)
        return None


sys.meta_path.insert(0, _WithoutTheEvaluateExtra())
_record(f"active {{os.getpid()}}")
"""


class Lean:
    """An environment without the extra, and what its processes recorded."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir()
        (directory / "sitecustomize.py").write_text(SITECUSTOMIZE)
        self.record = directory / "record.txt"
        self.record.touch()
        self.env = dict(os.environ)
        self.env["LEAN_INSTALL_RECORD"] = str(self.record)
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(directory), os.environ.get("PYTHONPATH")) if p
        )

    def lines(self, kind: str) -> list[str]:
        return [
            line.split(" ", 1)[1]
            for line in self.record.read_text().splitlines()
            if line.startswith(kind + " ")
        ]

    def python(self, script: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """Run `script` without the extra; fail with its output if the finder was not active."""
        done = subprocess.run(
            [sys.executable, "-c", script],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert self.lines("active"), f"the blocking finder did not load: {done.stderr[-3000:]}"
        return done


@pytest.fixture
def lean(tmp_path: Path) -> Lean:
    return Lean(tmp_path / "lean")


def test_every_module_of_the_node_imports_without_the_evaluate_extra(lean):
    script = """
import importlib, pkgutil, sys
failed = []
for package in ("dicom_node", "engine", "training"):
    root = importlib.import_module(package)
    for info in pkgutil.walk_packages(root.__path__, package + "."):
        try:
            importlib.import_module(info.name)
        except Exception as error:
            failed.append(f"{info.name}: {type(error).__name__}: {error}")
for light in ("evaluation", "evaluation.extra", "evaluation.labels", "evaluation.bars"):
    try:
        importlib.import_module(light)
    except Exception as error:
        failed.append(f"{light}: {type(error).__name__}: {error}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""
    done = lean.python(script)
    assert done.returncode == 0, f"modules that need the extra:\n{done.stdout}{done.stderr[-3000:]}"
    assert lean.lines("blocked") == [], "the node's packages try to import the extra's packages"


def test_check_config_and_bars_run_without_the_evaluate_extra(lean, tmp_path):
    site = write_site_config(tmp_path / "site.toml", tmp_path / "state", free_port())
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"summary": {}}))
    script = f"""
import sys
from dicom_node.cli import build_parser, main
args = build_parser().parse_args(["serve", "-c", {str(site)!r}])
assert args.func.__name__ == "cmd_serve", args
print("check-config", main(["check-config", "-c", {str(site)!r}]))
print("bars", main(["bars", {str(report)!r}]))
"""
    done = lean.python(script)
    assert done.returncode == 0, done.stderr[-3000:]
    results = dict(line.split() for line in done.stdout.splitlines() if line.startswith(("c", "b")))
    assert results["check-config"] == "0", done.stderr[-3000:]
    assert results["bars"] == "2", f"bars reads the report and names what it lacks: {done.stderr}"
    assert "Traceback" not in done.stderr
    assert lean.lines("blocked") == []


def test_evaluate_without_the_extra_prints_how_to_install_it_and_exits_69(lean, tmp_path):
    script = f"""
import sys
from dicom_node.cli import main
sys.exit(main(["evaluate", "--data", {str(tmp_path)!r}, "--out", {str(tmp_path / "out")!r}]))
"""
    done = lean.python(script)
    assert done.returncode == EXIT_UNAVAILABLE, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    for needed in (
        "ltdiff-node[evaluate]",
        "--no-build-isolation",
        "pyradiomics",
        "SimpleITK",
        "matplotlib",
        sys.executable,
    ):
        assert needed in done.stderr, f"{needed!r} missing from the hint:\n{done.stderr}"
    assert not (tmp_path / "out").exists()


def test_the_node_serves_a_series_without_the_evaluate_extra(lean, tmp_path, archive):
    """`ltdiff-node serve` in a process of its own, engine processes included: it starts, takes a
    series, standardizes it and sends the derived series on, with the extra unimportable."""
    port = free_port()
    site = write_site_config(
        tmp_path / "site.toml",
        tmp_path / "state",
        port,
        "[[destinations]]\n"
        f'name = "archive"\nae_title = "ARCHIVE"\nhost = "127.0.0.1"\nport = {archive.port}\n',
    )
    log = tmp_path / "node.log"
    proc = serve(site, log, env=lean.env)
    try:
        series = write_series(tmp_path / "in", n_slices=3, uid_seed="lean-install")
        to_node = DestinationConfig("node", "LTDIFF", "127.0.0.1", port)
        assert not send_paths(to_node, "PACS", series).failed

        def finished() -> list[dict[str, object]]:
            return [e for e in log_events(log) if e["event"] in ("series.done", "series.failed")]

        wait_until(finished, 180, "the series' canonical line")
        (line,) = finished()
        assert line["status"] == "done", line
        wait_until(lambda: archive.received == 3, 60, "the 3 derived instances at the archive")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert len(set(lean.lines("active"))) >= 2, "the engine process ran under the finder too"
    assert lean.lines("blocked") == [], "the node tried to import the extra's packages"
