"""The `evaluate` extra as packaged: pyproject's base dependencies leave out pyradiomics,
SimpleITK and matplotlib and the extra holds them; `make install` installs the node alone (the
service install) while `make demo` and `make test` install everything.

tests/component/test_lean_install.py runs the node and the CLI with the three unimportable.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from dicom_node.cli import main
from evaluation import extra

REPO = Path(__file__).resolve().parents[2]
EVALUATION_ONLY = {"pyradiomics", "simpleitk", "matplotlib"}


def _project() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def _name(requirement: str) -> str:
    """The normalized distribution name of a PEP 508 requirement."""
    return re.split(r"[\s\[<>=!~;@]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_base_dependencies_leave_out_the_evaluation_packages():
    base = {_name(r) for r in _project()["project"]["dependencies"]}
    assert not base & EVALUATION_ONLY, f"the node's own install would pull {base & EVALUATION_ONLY}"


def test_the_evaluate_extra_holds_the_packages_the_cli_checks_for():
    listed = _project()["project"]["optional-dependencies"]["evaluate"]
    assert {_name(r) for r in listed} == EVALUATION_ONLY
    assert {d.lower() for d in extra.MODULES.values()} == EVALUATION_ONLY
    assert extra.PYRADIOMICS_SPEC in listed, "the install hint asks for the version pyproject does"


def test_the_evaluation_package_is_packaged_and_type_checked():
    project = _project()
    assert "evaluation*" in project["tool"]["setuptools"]["packages"]["find"]["include"]
    assert "evaluation" in project["tool"]["mypy"]["packages"]


def test_missing_packages_names_the_unimportable_one(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert extra.missing_packages() == ["matplotlib"]


def test_install_hint_builds_pyradiomics_without_isolation_into_this_interpreter():
    hint = extra.install_hint(["pyradiomics", "SimpleITK"], "/opt/ltdiff-node/.venv/bin/python")
    lines = hint.splitlines()
    assert "Missing: pyradiomics, SimpleITK." in lines
    pip = "/opt/ltdiff-node/.venv/bin/python -m pip install"
    build_needs = lines.index(f"  {pip} numpy setuptools wheel versioneer")
    pyradiomics = lines.index(f"  {pip} --no-build-isolation '{extra.PYRADIOMICS_SPEC}'")
    the_extra = lines.index(f"  {pip} 'ltdiff-node[evaluate]'")
    assert build_needs < pyradiomics < the_extra, hint


def test_evaluate_with_the_extra_installed_runs_the_evaluation(capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["evaluate", "--help"])
    assert stopped.value.code == 0
    assert "usage: ltdiff-node evaluate" in capsys.readouterr().out


def _make_dry_run(tmp_path: Path, target: str, *variables: str) -> list[str]:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    done = subprocess.run(
        [make, "-n", "-C", str(REPO), target, f"VENV={tmp_path / 'venv'}", *variables],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.splitlines()


def _line(lines: list[str], needle: str) -> int:
    found = [i for i, line in enumerate(lines) if needle in line]
    assert found, f"no step with {needle!r}:\n" + "\n".join(lines)
    return found[0]


def test_make_install_installs_the_node_without_the_extra(tmp_path):
    lines = _make_dry_run(tmp_path, "install")
    steps = "\n".join(lines)
    assert "pyradiomics" not in steps and "[evaluate]" not in steps and "[dev]" not in steps, steps
    _line(lines, "pip install -q --no-deps --force-reinstall .")
    with_extra = _make_dry_run(tmp_path, "install", "EXTRAS=evaluate")
    _line(with_extra, "--no-build-isolation")


@pytest.mark.parametrize("target", ["demo", "test"])
def test_make_demo_and_make_test_install_the_dev_tools_and_the_evaluate_extra(tmp_path, target):
    lines = _make_dry_run(tmp_path, target)
    build_needs = _line(lines, "pip install -q numpy setuptools wheel versioneer")
    pyradiomics = _line(lines, 'pip install -q --no-build-isolation "pyradiomics')
    assert build_needs < pyradiomics < _line(lines, 'pip install -q ".[evaluate]"')
    assert _line(lines, 'pip install -q ".[dev]"') < _line(lines, "--no-deps --force-reinstall .")
