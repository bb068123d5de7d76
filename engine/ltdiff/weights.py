"""Self-describing LTDiff++ weights: one safetensors file holds everything to rebuild the engine.

Tensors: "autoencoder.<name>" (the UNet++ autoencoder), "denoiser.<name>" (the latent denoiser,
mode "ltdiff" only) and "schedule.alphas_cumprod" (abar_t, float32; checked on load against the
schedule recomputed from its config). String metadata (JSON where structured):

    format, format_version, engine_kind ("ltdiff" | "unetpp-regression"),
    autoencoder_config, denoiser_config, schedule_config, sampling (steps, eta, spacing),
    latent_scale, target_scale, normalization (HU clip and scale), source_kernel, target_kernel,
    training (command, steps, device, data summary ...), envelope (the validated input range,
    `engine.envelope`; "null" or absent in files before it existed), code_version, code_sha256,
    created

Loading is strict: unknown format or version, a kind that is not the expected one, a missing or
unexpected tensor, a shape that does not fit the stored config, or a schedule that does not match
its config raise `EngineError` with a message saying what differs. The modules are saved unwrapped
(no "module." or "_orig_mod." prefixes from DDP or torch.compile).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import torch
from safetensors.torch import load as _safetensors_load
from safetensors.torch import save as _safetensors_save
from torch import Tensor, nn

from engine import __version__
from engine.envelope import ValidatedEnvelope
from engine.interface import EngineError
from engine.linear_filter import read_weights_metadata
from engine.ltdiff.latent_diffusion import (
    DenoiserConfig,
    LatentDenoiser,
    NoiseSchedule,
    ScheduleConfig,
)
from engine.ltdiff.sampler import MAX_STEPS, TimestepSpacing
from engine.ltdiff.unetpp import UNetPlusPlusAutoencoder, UNetPPConfig

FORMAT_NAME: Final = "ltdiff-node/ltdiff"
FORMAT_VERSION: Final = "1"
MAX_SHIPPED_BYTES: Final = 30 * 1024 * 1024
SHIPPED_WEIGHTS: Final = {"br40d-bl64d": "ltdiff-br40d-bl64d.safetensors"}
_WRAPPER_PREFIXES: Final = ("module.", "_orig_mod.")
_CODE_FILES: Final = ("unetpp.py", "latent_diffusion.py", "sampler.py")


class EngineMode(StrEnum):
    """What a weights file runs: the full method, or the paper's UNet++-only ablation."""

    LTDIFF = "ltdiff"
    """E(A) -> DDIM in latent space conditioned on Z_A -> D(Z_B')."""
    UNETPP_REGRESSION = "unetpp-regression"
    """D(E(A)) trained to regress B directly (deterministic, a conditional mean)."""


@dataclass(frozen=True)
class HUNormalization:
    """HU <-> network units: clip to [low_hu, high_hu], then (HU - center_hu) / scale_hu.

    Defaults: the 12-bit storage range of the training data (-1024..3071 HU) and HU / 1000, i.e.
    mu / mu_water - 1: air -1, water 0, cortical bone ~ +1..+2, linear so noise keeps its shape in
    every tissue (no windowing that would squash bone or lung texture).
    """

    low_hu: float = -1024.0
    high_hu: float = 3071.0
    center_hu: float = 0.0
    scale_hu: float = 1000.0

    def __post_init__(self) -> None:
        if not (self.low_hu < self.high_hu and self.scale_hu > 0):
            raise ValueError(f"invalid HUNormalization {self}")

    def to_model(self, hu: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        clipped = np.clip(hu, self.low_hu, self.high_hu)
        return ((clipped - self.center_hu) / self.scale_hu).astype(np.float32)

    def to_hu(self, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        hu = x.astype(np.float32) * np.float32(self.scale_hu) + np.float32(self.center_hu)
        out: npt.NDArray[np.float32] = np.clip(hu, self.low_hu, self.high_hu).astype(np.float32)
        return out


@dataclass(frozen=True)
class SamplingConfig:
    """Default DDIM settings the engine uses with these weights.

    distilled: the denoiser is a student distilled to reproduce its teacher's whole DDIM
    trajectory in exactly `num_steps` evaluations from the same z_T (`--phase distill`); it is
    not a score model, so any other step count (or eta, which it has no use for) is refused.
    Files written before distillation existed have no such key and read as False.
    """

    num_steps: int = 8
    eta: float = 0.0
    spacing: TimestepSpacing = "trailing"
    distilled: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.num_steps <= MAX_STEPS:
            raise ValueError(
                f"SamplingConfig.num_steps must be 1..{MAX_STEPS}, got {self.num_steps}"
            )
        if self.distilled and self.eta != 0.0:
            raise ValueError("SamplingConfig: a distilled sampler is deterministic given z_T")


@dataclass(frozen=True)
class LTDiffWeights:
    """Everything a weights file holds, as objects (configs) and tensors (state dicts)."""

    mode: EngineMode
    autoencoder_config: UNetPPConfig
    autoencoder_state: Mapping[str, Tensor]
    source_kernel: str
    target_kernel: str
    denoiser_config: DenoiserConfig | None = None
    denoiser_state: Mapping[str, Tensor] | None = None
    schedule_config: ScheduleConfig | None = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    latent_scale: float = 1.0
    """s: scales the condition Z_A (and z_0 for target "latent") to unit variance."""
    target_scale: float = 1.0
    """s_r: scales z_0 = Z_B - Z_A to unit variance (target "residual")."""
    normalization: HUNormalization = field(default_factory=HUNormalization)
    training: Mapping[str, object] = field(default_factory=dict)
    envelope: ValidatedEnvelope | None = None
    """The inputs the weights were trained and validated on (None: files before issue 9)."""

    def __post_init__(self) -> None:
        if self.mode is EngineMode.LTDIFF and (
            self.denoiser_config is None
            or self.denoiser_state is None
            or self.schedule_config is None
        ):
            raise ValueError("mode 'ltdiff' needs a denoiser config, its state and a schedule")

    def build_autoencoder(self) -> UNetPlusPlusAutoencoder:
        model = UNetPlusPlusAutoencoder(self.autoencoder_config)
        _load_state(model, self.autoencoder_state, "autoencoder", "<weights>")
        return model.eval()

    def build_denoiser(self) -> LatentDenoiser:
        if self.denoiser_config is None or self.denoiser_state is None:
            raise EngineError(f"weights of mode {self.mode.value!r} hold no latent denoiser")
        model = LatentDenoiser(self.denoiser_config)
        _load_state(model, self.denoiser_state, "denoiser", "<weights>")
        return model.eval()


def unwrap_state(module: nn.Module) -> dict[str, Tensor]:
    """state_dict of the module inside DDP / torch.compile wrappers, keys without their prefixes."""
    inner: nn.Module = module
    while True:
        if isinstance(inner, nn.parallel.DistributedDataParallel):
            inner = inner.module
        elif hasattr(inner, "_orig_mod") and isinstance(inner._orig_mod, nn.Module):
            inner = inner._orig_mod
        else:
            break
    state = {k: v.detach().cpu().contiguous() for k, v in inner.state_dict().items()}
    bad = [k for k in state if k.startswith(_WRAPPER_PREFIXES)]
    if bad:
        raise ValueError(f"state dict still carries wrapper prefixes: {bad[:3]}")
    return state


def code_sha256() -> str:
    """SHA-256 over the architecture and sampler source files: which code built the weights."""
    digest = hashlib.sha256()
    package = resources.files("engine.ltdiff")
    for name in _CODE_FILES:
        digest.update(name.encode())
        digest.update((package / name).read_bytes())
    return digest.hexdigest()


def save_weights(path: Path, weights: LTDiffWeights, *, created: str | None = None) -> str:
    """Write a self-describing safetensors file; returns its SHA-256 (hex)."""
    tensors: dict[str, Tensor] = {
        f"autoencoder.{k}": v.detach().float().cpu().contiguous()
        for k, v in weights.autoencoder_state.items()
    }
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "engine_kind": weights.mode.value,
        "autoencoder_config": weights.autoencoder_config.to_json(),
        "denoiser_config": "null",
        "schedule_config": "null",
        "sampling": json.dumps(asdict(weights.sampling), sort_keys=True),
        "latent_scale": repr(float(weights.latent_scale)),
        "target_scale": repr(float(weights.target_scale)),
        "normalization": json.dumps(asdict(weights.normalization), sort_keys=True),
        "source_kernel": weights.source_kernel,
        "target_kernel": weights.target_kernel,
        "training": json.dumps(dict(weights.training), sort_keys=True, default=str),
        "envelope": weights.envelope.to_json() if weights.envelope is not None else "null",
        "code_version": __version__,
        "code_sha256": code_sha256(),
        "created": created or datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if weights.denoiser_config is not None and weights.denoiser_state is not None:
        metadata["denoiser_config"] = weights.denoiser_config.to_json()
        tensors.update(
            {
                f"denoiser.{k}": v.detach().float().cpu().contiguous()
                for k, v in weights.denoiser_state.items()
            }
        )
    if weights.schedule_config is not None:
        metadata["schedule_config"] = weights.schedule_config.to_json()
        tensors["schedule.alphas_cumprod"] = NoiseSchedule.from_config(
            weights.schedule_config
        ).alphas_cumprod
    data = _safetensors_save(tensors, metadata=metadata)
    Path(path).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _load_state(module: nn.Module, state: Mapping[str, Tensor], what: str, source: str) -> None:
    """load_state_dict(strict) with a message listing missing, unexpected and mis-shaped tensors."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs config {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s), e.g. {unexpected[:3]}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es), e.g. {shapes[:3]}")
        raise EngineError(
            f"{source}: {what} tensors do not fit the {what} config stored in the file: "
            + "; ".join(parts)
        )
    module.load_state_dict(dict(state), strict=True)


def parse_weights(data: bytes, *, source: str, expected_kind: str | None = None) -> LTDiffWeights:
    """Parse a weights file strictly (module docstring); EngineError says what differs."""
    meta = read_weights_metadata(data, source=source)
    for key, want in (("format", FORMAT_NAME), ("format_version", FORMAT_VERSION)):
        if meta.get(key) != want:
            raise EngineError(f"{source}: metadata {key} is {meta.get(key)!r}, expected {want!r}")
    kinds = [m.value for m in EngineMode]
    kind = meta.get("engine_kind", "")
    if kind not in kinds:
        raise EngineError(f"{source}: engine_kind {kind!r} is not one of {kinds}")
    if expected_kind is not None and kind != expected_kind:
        raise EngineError(
            f"{source}: weights are for engine kind {kind!r}, but kind {expected_kind!r} was "
            f"configured"
        )
    required = (
        "autoencoder_config",
        "denoiser_config",
        "schedule_config",
        "sampling",
        "latent_scale",
        "target_scale",
        "normalization",
        "source_kernel",
        "target_kernel",
        "training",
    )
    missing = [k for k in required if k not in meta]
    if missing:
        raise EngineError(f"{source}: metadata lacks {missing}; not a complete {FORMAT_NAME} file")
    try:
        ae_cfg = UNetPPConfig.from_dict(json.loads(meta["autoencoder_config"]))
        den_raw = json.loads(meta["denoiser_config"])
        sch_raw = json.loads(meta["schedule_config"])
        den_cfg = None if den_raw is None else DenoiserConfig.from_dict(den_raw)
        sch_cfg = None if sch_raw is None else ScheduleConfig.from_dict(sch_raw)
        sampling = SamplingConfig(**json.loads(meta["sampling"]))
        norm = HUNormalization(**json.loads(meta["normalization"]))
        training = json.loads(meta["training"])
        latent_scale = float(meta["latent_scale"])
        target_scale = float(meta["target_scale"])
        envelope_raw = json.loads(meta.get("envelope", "null"))
        envelope = None if envelope_raw is None else ValidatedEnvelope.from_dict(envelope_raw)
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise EngineError(f"{source}: invalid configuration metadata: {exc}") from exc
    try:
        tensors = _safetensors_load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError and ValueError types
        raise EngineError(f"{source}: unreadable safetensors tensors: {exc}") from exc
    groups: dict[str, dict[str, Tensor]] = {"autoencoder": {}, "denoiser": {}, "schedule": {}}
    for name, tensor in tensors.items():
        prefix, _, rest = name.partition(".")
        if prefix not in groups or not rest:
            raise EngineError(f"{source}: unexpected tensor {name!r}")
        groups[prefix][rest] = tensor
    _load_state(UNetPlusPlusAutoencoder(ae_cfg), groups["autoencoder"], "autoencoder", source)
    mode = EngineMode(kind)
    if mode is EngineMode.LTDIFF:
        if den_cfg is None or sch_cfg is None:
            raise EngineError(f"{source}: an 'ltdiff' file needs denoiser and schedule configs")
        _load_state(LatentDenoiser(den_cfg), groups["denoiser"], "denoiser", source)
        stored = groups["schedule"].get("alphas_cumprod")
        expected = NoiseSchedule.from_config(sch_cfg).alphas_cumprod
        if stored is None or stored.shape != expected.shape or not torch.equal(stored, expected):
            raise EngineError(
                f"{source}: stored schedule.alphas_cumprod does not match the schedule computed "
                f"from its config {sch_cfg}"
            )
    elif groups["denoiser"]:
        raise EngineError(f"{source}: mode {kind!r} must not hold denoiser tensors")
    return LTDiffWeights(
        mode=mode,
        autoencoder_config=ae_cfg,
        autoencoder_state=groups["autoencoder"],
        source_kernel=meta["source_kernel"],
        target_kernel=meta["target_kernel"],
        denoiser_config=den_cfg,
        denoiser_state=groups["denoiser"] or None,
        schedule_config=sch_cfg,
        sampling=sampling,
        latent_scale=latent_scale,
        target_scale=target_scale,
        normalization=norm,
        training=training,
        envelope=envelope,
    )


def load_weights(path: Path, *, expected_kind: str | None = None) -> tuple[LTDiffWeights, str]:
    """(weights, SHA-256 of the file), read strictly."""
    data = Path(path).read_bytes()
    return parse_weights(data, source=str(path), expected_kind=expected_kind), hashlib.sha256(
        data
    ).hexdigest()


def shipped_weights_path(pair: str = "br40d-bl64d") -> Path:
    """Where the shipped LTDiff++ weights live in the installed `engine/weights` data folder."""
    if pair not in SHIPPED_WEIGHTS:
        raise EngineError(
            f"no shipped LTDiff++ weights for {pair!r}; known: {sorted(SHIPPED_WEIGHTS)}"
        )
    path = Path(str(resources.files("engine") / "weights" / SHIPPED_WEIGHTS[pair]))
    if not path.is_file():
        raise EngineError(
            f"shipped LTDiff++ weights {path} are not installed: train them "
            f"(`ltdiff-node train ltdiff ...`, docs/MODEL_CARD.md) or configure a weights path"
        )
    return path
