"""Which engines the node can run, and how each is built from its weights.

This module is the one place where engine kinds are registered: config validation uses
`KNOWN_ENGINE_KINDS`, the worker calls `load_engine`. To add an engine (the learned LTDiff++
engine will be "ltdiff"), write a loader `(weights, device) -> Engine` and add it to `_LOADERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Final

from engine.interface import Engine, EngineError
from engine.linear_filter import ENGINE_KIND as LINEAR_FILTER_KIND
from engine.linear_filter import LinearFilterEngine, shipped_weights_path


def _load_linear_filter(weights: Path | None, device: str) -> Engine:
    del device  # a few FFTs per slice: the filter runs on the CPU whatever device is configured
    return LinearFilterEngine.from_file(weights if weights is not None else shipped_weights_path())


_LOADERS: Final[dict[str, Callable[[Path | None, str], Engine]]] = {
    LINEAR_FILTER_KIND: _load_linear_filter,
    # "ltdiff": the learned LTDiff++ engine registers here.
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
