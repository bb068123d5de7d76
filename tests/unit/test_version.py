"""The version is written once (pyproject.toml) and read from the package metadata."""

import tomllib
from importlib import metadata
from pathlib import Path

import dicom_node
import engine
from engine import _version

REPO = Path(__file__).resolve().parents[2]


def _pyproject_version() -> str:
    return str(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"])


def test_every_package_reports_the_pyproject_version():
    assert engine.__version__ == dicom_node.__version__ == _pyproject_version()


def test_installed_metadata_wins(monkeypatch):
    monkeypatch.setattr(_version.metadata, "version", lambda name: "9.8.7")
    assert _version.package_version() == "9.8.7"


def test_a_source_checkout_without_metadata_reads_its_pyproject(monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(_version.metadata, "version", missing)
    # The checkout's pyproject, named explicitly: under `make test` the package is imported from
    # the installed copy in site-packages, which has no pyproject.toml beside it.
    assert _version.package_version(REPO / "pyproject.toml") == _pyproject_version()


def test_no_metadata_and_no_pyproject_is_unknown_not_a_guess(monkeypatch, tmp_path):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(_version.metadata, "version", missing)
    assert _version.package_version(tmp_path / "pyproject.toml") == _version.UNKNOWN
    other = tmp_path / "pyproject.toml"
    other.write_text('[project]\nname = "something-else"\nversion = "1.0"\n')
    assert _version.package_version(other) == _version.UNKNOWN
