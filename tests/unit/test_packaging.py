"""The installed distribution holds every module and data file of the source tree.

`make test` installs the package non-editable and tests run with --import-mode=importlib, so a
module missing from the wheel (a new subpackage left out of the package list) fails here even if
no other test imports it.
"""

import importlib.util
from importlib.resources import files
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCE_MODULES = sorted(
    ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
    for top in ("dicom_node", "engine", "training", "evaluation")
    for p in (REPO / top).rglob("*.py")
)


@pytest.mark.parametrize("module", SOURCE_MODULES)
def test_every_source_module_is_installed(module):
    assert importlib.util.find_spec(module) is not None, f"{module} is not in the installed package"


def test_shipped_weights_are_installed():
    shipped = sorted(p.name for p in (REPO / "engine" / "weights").glob("*.safetensors"))
    installed = sorted(
        p.name
        for p in files("engine").joinpath("weights").iterdir()
        if p.name.endswith(".safetensors")
    )
    assert shipped, "the repository ships at least the linear filter's weights"
    assert installed == shipped
