"""The version of ltdiff-node, written once: `version` in pyproject.toml.

An installed package reports it through its metadata (importlib.metadata). A source checkout run
without installing (PYTHONPATH pointing at it) has no metadata of its own, so the checkout's
pyproject.toml is read instead; anything else is "0+unknown", never a guess.
"""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "ltdiff-node"
UNKNOWN = "0+unknown"
_PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def package_version(pyproject: Path = _PYPROJECT) -> str:
    """The installed distribution's version, else `project.version` of a source checkout's
    pyproject.toml, else UNKNOWN."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        pass
    try:
        with pyproject.open("rb") as handle:
            project = tomllib.load(handle).get("project", {})
    except (OSError, tomllib.TOMLDecodeError):
        return UNKNOWN
    if project.get("name") != DISTRIBUTION or not isinstance(project.get("version"), str):
        return UNKNOWN
    return str(project["version"])
