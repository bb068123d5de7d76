"""Which engines the node can run, and how each is built from its weights.

This module is the one place where engine kinds are registered: config validation uses
`KNOWN_ENGINE_KINDS`, the worker calls `load_engine`. To add an engine, write a loader
`(weights, device) -> Engine` and add it to `_LOADERS`. Kinds: "linear-filter" (the default),
"ltdiff" (LTDiff++) and "unetpp-regression" (its UNet++-only ablation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from engine.interface import Engine, EngineError
from engine.linear_filter import ENGINE_KIND, LinearFilterEngine, shipped_weights_path

LINEAR_FILTER_KIND: Final = ENGINE_KIND
"""The classical fitted filter (engine/linear_filter.py), the default."""
LTDIFF_KIND: Final = "ltdiff"
"""LTDiff++: UNet++ autoencoder + conditional latent diffusion (engine/ltdiff, docs/METHOD.md)."""
MAX_SAMPLE_STEPS: Final = 10
"""Most sampling steps an ltdiff engine may be configured with (engine.ltdiff.sampler.MAX_STEPS;
kept here so that config validation does not import torch)."""
PRECISIONS: Final = ("auto", "float32", "denoiser-bf16", "bf16")
"""Precision settings of the ltdiff engine (engine.ltdiff.engine.PRECISIONS, without torch)."""
UNETPP_REGRESSION_KIND: Final = "unetpp-regression"
"""The paper's ablation: the UNet++ alone, regressing the target kernel (needs a weights path)."""


@dataclass(frozen=True)
class EngineOptions:
    """Run-time options of the learned engines (None: the weights' or the device's default).

    sample_steps: DDIM steps of LTDiff++ (1..10); fewer is faster and changes the output (the
        derived series gets a new UID). Only for "ltdiff".
    batch_slices: slices per forward pass; bounds the engine's memory, does not change the output.
        For "ltdiff" and "unetpp-regression".
    precision: where bf16 is used, always only where the hardware runs it natively: "bf16"
        (the denoiser and the bodies of the encoder and decoder; their linear shortcuts stay
        float32), "denoiser-bf16" (the denoiser only), "float32" (nowhere: slower,
        bit-identical across machines of one kind), "auto" (= "bf16", docs/METHOD.md
        "Inference"). For "ltdiff".
    """

    sample_steps: int | None = None
    batch_slices: int | None = None
    precision: str = "auto"


def _load_linear_filter(weights: Path | None, device: str, options: EngineOptions) -> Engine:
    del device  # a few FFTs per slice: the filter runs on the CPU whatever device is configured
    if options != EngineOptions():
        raise EngineError(
            "engine kind 'linear-filter' takes no sample_steps, batch_slices or precision"
        )
    return LinearFilterEngine.from_file(weights if weights is not None else shipped_weights_path())


def _load_ltdiff(kind: str, weights: Path | None, device: str, options: EngineOptions) -> Engine:
    # torch is imported only when a learned engine is configured: the linear default stays light.
    from engine.ltdiff.engine import PRECISIONS as LTDIFF_PRECISIONS  # noqa: PLC0415
    from engine.ltdiff.engine import LTDiffEngine  # noqa: PLC0415
    from engine.ltdiff.weights import shipped_weights_path as ltdiff_shipped  # noqa: PLC0415

    if weights is None:
        if kind != LTDIFF_KIND:
            raise EngineError(f"engine kind {kind!r} has no shipped weights; give a weights path")
        weights = ltdiff_shipped()
    if kind != LTDIFF_KIND and options.sample_steps is not None:
        raise EngineError(f"engine kind {kind!r} does not sample: sample_steps does not apply")
    if options.precision not in PRECISIONS:
        raise EngineError(f"precision must be one of {PRECISIONS}, got {options.precision!r}")
    return LTDiffEngine.from_file(
        weights,
        expected_kind=kind,
        device=device,
        num_steps=options.sample_steps,
        batch_slices=options.batch_slices,
        precision=next(p for p in LTDIFF_PRECISIONS if p == options.precision),
    )


_LOADERS: Final[dict[str, Callable[[Path | None, str, EngineOptions], Engine]]] = {
    LINEAR_FILTER_KIND: _load_linear_filter,
    LTDIFF_KIND: lambda weights, device, options: _load_ltdiff(
        LTDIFF_KIND, weights, device, options
    ),
    UNETPP_REGRESSION_KIND: lambda weights, device, options: _load_ltdiff(
        UNETPP_REGRESSION_KIND, weights, device, options
    ),
}

KNOWN_ENGINE_KINDS: Final[tuple[str, ...]] = tuple(_LOADERS)


def load_engine(
    kind: str,
    weights: Path | None = None,
    device: str = "cpu",
    options: EngineOptions | None = None,
) -> Engine:
    """Build an engine of `kind` from a weights file (None: the kind's shipped weights, if any).

    Raises EngineError for an unknown kind, weights that do not fit the kind, or options the
    kind does not take.
    """
    loader = _LOADERS.get(kind)
    if loader is None:
        raise EngineError(
            f"unknown engine kind {kind!r}; known kinds: {', '.join(KNOWN_ENGINE_KINDS)}"
        )
    return loader(weights, device, options or EngineOptions())
