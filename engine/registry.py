"""Which engines the node can run, and how each is built from its weights.

This module is the one place where engine kinds are registered: config validation uses
`KNOWN_ENGINE_KINDS`, the worker calls `load_engine`. To add an engine, write a loader
`(weights, device) -> Engine` and add it to `_LOADERS`. Kinds: "linear-filter" (the default),
"ltdiff" (LTDiff++) and "unetpp-regression" (its UNet++-only ablation).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Final

from engine.interface import Engine, EngineError
from engine.linear_filter import ENGINE_KIND as LINEAR_FILTER_KIND
from engine.linear_filter import LinearFilterEngine, shipped_weights_path

LTDIFF_KIND: Final = "ltdiff"
"""LTDiff++: UNet++ autoencoder + conditional latent diffusion (engine/ltdiff, docs/METHOD.md)."""
UNETPP_REGRESSION_KIND: Final = "unetpp-regression"
"""The paper's ablation: the UNet++ alone, regressing the target kernel (needs a weights path)."""


def _load_linear_filter(weights: Path | None, device: str) -> Engine:
    del device  # a few FFTs per slice: the filter runs on the CPU whatever device is configured
    return LinearFilterEngine.from_file(weights if weights is not None else shipped_weights_path())


def _load_ltdiff(kind: str, weights: Path | None, device: str) -> Engine:
    # torch is imported only when a learned engine is configured: the linear default stays light.
    from engine.ltdiff.engine import LTDiffEngine  # noqa: PLC0415
    from engine.ltdiff.weights import shipped_weights_path as ltdiff_shipped  # noqa: PLC0415

    if weights is None:
        if kind != LTDIFF_KIND:
            raise EngineError(f"engine kind {kind!r} has no shipped weights; give a weights path")
        weights = ltdiff_shipped()
    return LTDiffEngine.from_file(weights, expected_kind=kind, device=device)


_LOADERS: Final[dict[str, Callable[[Path | None, str], Engine]]] = {
    LINEAR_FILTER_KIND: _load_linear_filter,
    LTDIFF_KIND: lambda weights, device: _load_ltdiff(LTDIFF_KIND, weights, device),
    UNETPP_REGRESSION_KIND: lambda weights, device: _load_ltdiff(
        UNETPP_REGRESSION_KIND, weights, device
    ),
}

KNOWN_ENGINE_KINDS: Final[tuple[str, ...]] = tuple(_LOADERS)


def load_engine(kind: str, weights: Path | None = None, device: str = "cpu") -> Engine:
    """Build an engine of `kind` from a weights file (None: the kind's shipped weights, if any).

    Raises EngineError for an unknown kind or weights that do not fit the kind.
    """
    loader = _LOADERS.get(kind)
    if loader is None:
        raise EngineError(
            f"unknown engine kind {kind!r}; known kinds: {', '.join(KNOWN_ENGINE_KINDS)}"
        )
    return loader(weights, device)
