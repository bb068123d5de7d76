"""The `evaluate` extra: what `ltdiff-node evaluate` needs beyond the node, and how to get it.

The node (`serve`, `standardize`, `train`, ...) runs without pyradiomics, SimpleITK and
matplotlib, so a hospital install does not build pyradiomics from source; they come with
`ltdiff-node[evaluate]`. The CLI calls `missing_packages()` before it imports
`evaluation.evaluate` and prints `install_hint()` instead of a traceback.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Final

EXTRA: Final = "evaluate"
MODULES: Final = {"radiomics": "pyradiomics", "SimpleITK": "SimpleITK", "matplotlib": "matplotlib"}
"""Import name -> distribution name of every package of the extra (pyproject.toml lists them)."""
PYRADIOMICS_SPEC: Final = "pyradiomics>=3.0.1"
"""As in pyproject.toml's extra and the Makefile."""
PYRADIOMICS_BUILD_NEEDS: Final = ("numpy", "setuptools", "wheel", "versioneer")
"""pyradiomics' build requirements, installed first because it is built without isolation."""


def missing_packages() -> list[str]:
    """The extra's distributions that cannot be imported here; with the reason where the
    package is there but its import fails.

    Imports for real rather than only looking the modules up: a package that is present but
    broken (a failed source build, a numpy it was not built against) is missing too.
    """
    missing = []
    for module, distribution in MODULES.items():
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            missing.append(distribution if error.name == module else f"{distribution} ({error})")
        except ImportError as error:
            missing.append(f"{distribution} ({error})")
    return missing


def install_hint(missing: Sequence[str], python: str = "python") -> str:
    """What to tell the user when `missing_packages()` is not empty; `python` is the
    interpreter of the install (sys.executable), so the commands install into the right one."""
    pip = f"{python} -m pip install"
    return "\n".join(
        [
            f"ltdiff-node evaluate needs the '{EXTRA}' extra, which this install leaves out "
            "(the node itself does not need it).",
            f"Missing: {', '.join(missing)}.",
            "Install it into this environment. pyradiomics is published as source only and",
            "must be built without build isolation, after its build requirements:",
            f"  {pip} {' '.join(PYRADIOMICS_BUILD_NEEDS)}",
            f"  {pip} --no-build-isolation '{PYRADIOMICS_SPEC}'",
            f"  {pip} 'ltdiff-node[{EXTRA}]'",
            f"From a source checkout, `make install EXTRAS={EXTRA}` runs the same steps.",
        ]
    )
