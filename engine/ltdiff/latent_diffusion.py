"""The conditional DDPM of LTDiff++ in the autoencoder's latent space: schedule and denoiser.

Notation (Ho et al. 2020, "DDPM"; Nichol & Dhariwal 2021; Salimans & Ho 2022):

    forward process   q(z_t | z_0) = N(sqrt(abar_t) z_0, (1 - abar_t) I)
                      abar_t = prod_{s<=t} (1 - beta_s)
                      z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps      (DDPM eq. 4)
    learned reverse   p_theta(z_{t-1} | z_t, c)   with c = Z_A, the source-kernel latent

Here z_0 = s * Z_B, the target-kernel latent E(B) times the latent scale s (unit variance), or
by default its residual s_r * (Z_B - Z_A) (`DiffusionTarget`), and the network predicts, per
`Prediction`, either eps, z_0 ("sample") or v = sqrt(abar) eps - sqrt(1-abar) z_0 (Salimans &
Ho eq. 9). The paper conditions the reverse process on Z_B; at inference only the source image
exists, so we condition on Z_A (docs/METHOD.md).

The schedule is a pure function of its config: computed in float64 (products of ~1000 factors lose
digits in float32), stored in float32 (`NoiseSchedule`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Literal, cast

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F  # noqa: N812 (the conventional alias)
from torch import Tensor, nn

from engine.ltdiff.unetpp import ConvBlock

ScheduleKind = Literal["linear", "scaled_linear", "cosine"]
Prediction = Literal["epsilon", "sample", "v"]
DiffusionTarget = Literal["residual", "latent"]
"""What z_0 of the diffusion is. "latent": z_0 = s * Z_B (the paper). "residual": z_0 =
s_r * (Z_B - Z_A), the standard latent's difference from the source latent, so the network
generates only what the kernels do not share (sharpening and the fine-grain noise) instead of
having to reproduce the whole anatomy to a few HU through every step; Z_B' = Z_A + z_0 / s_r."""

COSINE_OFFSET = 0.008
"""s of the cosine schedule (Nichol & Dhariwal 2021, eq. 17)."""
SeriesCondition = Literal["none", "spacing-noise"]
"""What the denoiser knows about the series besides its latent. "none": nothing (weights before
the clinical-envelope run). "spacing-noise": the pixel spacing and the noise level measured from
the source pixels (`engine.noise_level.measure_noise_hu`), as `series_condition_vector`: the
sharp kernel's grain, and how much of it is aliased, depend on both (docs/METHOD.md)."""

CONDITION_REFERENCE_SPACING_MM = 0.75
CONDITION_REFERENCE_NOISE_HU = 15.0
CONDITION_NOISE_FLOOR_HU = 1.0
CONDITION_FEATURES = {"none": 0, "spacing-noise": 2}

MAX_BETA = 0.999
"""Clip of beta_t for the cosine schedule near t = T (Nichol & Dhariwal 2021, section 3.2)."""


@dataclass(frozen=True)
class ScheduleConfig:
    """A variance schedule beta_1..beta_T.

    kind: "linear" (DDPM: beta linear from beta_start to beta_end), "scaled_linear" (latent
        diffusion: sqrt(beta) linear), or "cosine" (abar_t = cos^2(((t/T) + s)/(1 + s) * pi/2),
        normalized to abar at t = 0 before the first step).
    num_train_timesteps: T.
    """

    kind: ScheduleKind = "cosine"
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "scaled_linear", "cosine"):
            raise ValueError(
                f"ScheduleConfig.kind must be linear, scaled_linear or cosine, got {self.kind!r}"
            )
        if self.num_train_timesteps < 2:
            raise ValueError(
                f"ScheduleConfig.num_train_timesteps must be >= 2, got {self.num_train_timesteps}"
            )
        if not 0.0 < self.beta_start < self.beta_end < 1.0:
            raise ValueError(
                f"ScheduleConfig needs 0 < beta_start < beta_end < 1, got "
                f"{self.beta_start}, {self.beta_end}"
            )

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> ScheduleConfig:
        return cls(**dict(data))  # type: ignore[arg-type]


def betas(config: ScheduleConfig) -> npt.NDArray[np.float64]:
    """beta_t for t = 0..T-1 (0-based: index t is the paper's step t+1), float64."""
    n = config.num_train_timesteps
    if config.kind == "linear":
        return np.linspace(config.beta_start, config.beta_end, n, dtype=np.float64)
    if config.kind == "scaled_linear":
        return np.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=np.float64) ** 2

    def f(t: float) -> float:  # Nichol & Dhariwal eq. 17 (before normalization by f(0))
        return math.cos((t / n + COSINE_OFFSET) / (1.0 + COSINE_OFFSET) * math.pi / 2.0) ** 2

    # beta_t = 1 - abar(t+1)/abar(t), clipped (eq. 17 and the text after it).
    return np.array([min(1.0 - f(t + 1) / f(t), MAX_BETA) for t in range(n)], dtype=np.float64)


def alphas_cumprod(config: ScheduleConfig) -> npt.NDArray[np.float64]:
    """abar_t = prod_{s<=t} (1 - beta_s) for t = 0..T-1, float64 (DDPM eq. 4)."""
    return np.cumprod(1.0 - betas(config), dtype=np.float64)


@dataclass(frozen=True)
class NoiseSchedule:
    """abar_t stored float32 (computed in float64 by `alphas_cumprod`), with its config."""

    config: ScheduleConfig
    alphas_cumprod: Tensor

    @classmethod
    def from_config(cls, config: ScheduleConfig) -> NoiseSchedule:
        return cls(config, torch.from_numpy(alphas_cumprod(config).astype(np.float32)))

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    def abar(self, t: Tensor, like: Tensor) -> Tensor:
        """abar_t for a batch of integer timesteps, shaped [N, 1, 1, 1] on like's device/dtype."""
        a = self.alphas_cumprod.to(like.device)[t.long().to(like.device)]
        return a.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def q_sample(schedule: NoiseSchedule, z0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps (DDPM eq. 4)."""
    a = schedule.abar(t, z0)
    return a.sqrt() * z0 + (1.0 - a).sqrt() * noise


def training_target(prediction: Prediction, z0: Tensor, noise: Tensor, abar: Tensor) -> Tensor:
    """What the network is trained to output: eps, z_0, or v = sqrt(abar) eps - sqrt(1-abar) z_0."""
    if prediction == "epsilon":
        return noise
    if prediction == "sample":
        return z0
    return abar.sqrt() * noise - (1.0 - abar).sqrt() * z0


def split_prediction(
    prediction: Prediction, model_output: Tensor, z_t: Tensor, abar: Tensor
) -> tuple[Tensor, Tensor]:
    """(z_0 estimate, eps estimate) from a network output at z_t (DDIM eq. 9; v: Salimans & Ho)."""
    if prediction == "epsilon":
        eps = model_output
        z0 = (z_t - (1.0 - abar).sqrt() * eps) / abar.sqrt()
    elif prediction == "sample":
        z0 = model_output
        eps = (z_t - abar.sqrt() * z0) / (1.0 - abar).sqrt()
    else:  # v: z_0 = sqrt(abar) z_t - sqrt(1-abar) v ; eps = sqrt(1-abar) z_t + sqrt(abar) v
        z0 = abar.sqrt() * z_t - (1.0 - abar).sqrt() * model_output
        eps = (1.0 - abar).sqrt() * z_t + abar.sqrt() * model_output
    return z0, eps


@dataclass(frozen=True)
class DenoiserConfig:
    """Architecture of the conditional latent denoiser eps_theta(z_t, t, Z_A).

    latent_channels: C_z of the autoencoder's latent (input: z_t and Z_A concatenated).
    patch: space-to-depth factor applied to the latent before the UNet (1 or 2): the UNet then
        runs at a quarter of the latent's pixels, which is what makes 10 steps affordable.
    channels: channels per resolution level of the denoising UNet.
    time_embed_dim: width of the timestep embedding.
    prediction: what the network outputs (`Prediction`).
    target: what the diffusion generates (`DiffusionTarget`).
    """

    latent_channels: int = 8
    patch: int = 2
    channels: tuple[int, ...] = (32, 64, 128)
    time_embed_dim: int = 128
    groups: int = 8
    prediction: Prediction = "v"
    target: DiffusionTarget = "residual"
    condition: SeriesCondition = "none"

    def __post_init__(self) -> None:
        if self.condition not in CONDITION_FEATURES:
            raise ValueError(
                f"DenoiserConfig.condition must be one of {sorted(CONDITION_FEATURES)}, got "
                f"{self.condition!r}"
            )
        if self.target not in ("residual", "latent"):
            raise ValueError(
                f"DenoiserConfig.target must be residual or latent, got {self.target!r}"
            )
        if self.patch not in (1, 2):
            raise ValueError(f"DenoiserConfig.patch must be 1 or 2, got {self.patch}")
        if not self.channels or any(c <= 0 for c in self.channels):
            raise ValueError(f"DenoiserConfig.channels must be positive, got {self.channels}")
        if self.prediction not in ("epsilon", "sample", "v"):
            raise ValueError(
                f"DenoiserConfig.prediction must be epsilon, sample or v, got {self.prediction!r}"
            )

    @property
    def condition_features(self) -> int:
        """Length of the series condition vector (0: unconditioned)."""
        return CONDITION_FEATURES[self.condition]

    @property
    def size_multiple(self) -> int:
        """Latent rows and columns must be multiples of this."""
        return int(self.patch * 2 ** (len(self.channels) - 1))

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> DenoiserConfig:
        d = dict(data)
        if "channels" in d:
            d["channels"] = tuple(int(c) for c in cast(list[int], d["channels"]))
        return cls(**d)  # type: ignore[arg-type]


def diffusion_x0(target: DiffusionTarget, z_a: Tensor, z_b: Tensor, scale: float) -> Tensor:
    """z_0 of the diffusion from unscaled latents Z_A, Z_B (`DiffusionTarget`); scale: s or s_r."""
    return (z_b - z_a) * scale if target == "residual" else z_b * scale


def standard_latent(target: DiffusionTarget, z_a: Tensor, z0: Tensor, scale: float) -> Tensor:
    """Z_B' (unscaled) from a generated z_0: the inverse of `diffusion_x0` given Z_A."""
    return z_a + z0 / scale if target == "residual" else z0 / scale


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (float) timesteps, [N] -> [N, dim] (Transformer / DDPM)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def series_condition_vector(
    kind: SeriesCondition, pixel_spacing_mm: float, noise_hu: float
) -> list[float]:
    """The denoiser's series condition: log-ratios to reference values, scaled to about unit
    range over the clinical envelope (0.6-1.0 mm pixels, noise 5-40 HU)."""
    if kind == "none":
        return []
    if not (pixel_spacing_mm > 0 and math.isfinite(pixel_spacing_mm) and noise_hu >= 0):
        raise ValueError(
            f"series condition needs a positive pixel spacing and a noise level >= 0, got "
            f"{pixel_spacing_mm} mm and {noise_hu} HU"
        )
    # A noise-free input (a digital phantom) is far outside any envelope; the floor keeps the
    # logarithm finite for a route that processes such a series anyway.
    noise = max(noise_hu, CONDITION_NOISE_FLOOR_HU)
    return [
        math.log(pixel_spacing_mm / CONDITION_REFERENCE_SPACING_MM) / 0.25,
        math.log(noise / CONDITION_REFERENCE_NOISE_HU) / 0.5,
    ]


class TimeBlock(nn.Module):
    """A ConvBlock whose features are scaled and shifted by the timestep embedding (FiLM)."""

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, groups: int) -> None:
        super().__init__()
        self.block = ConvBlock(in_channels, out_channels, groups)
        self.film = nn.Linear(embed_dim, 2 * out_channels)
        self.out = nn.Conv2d(out_channels, out_channels, 3, padding=1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.block(x)
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        if torch.is_grad_enabled():
            h = h * (1.0 + scale) + shift
        else:  # inference: the same operations in place on the block's fresh output
            h = h.mul_(1.0 + scale).add_(shift)
        out: Tensor = h + self.out(F.silu(h))
        return out


class LatentDenoiser(nn.Module):
    """A small time-conditioned UNet: (z_t, t, Z_A) -> prediction of shape z_t.

    The condition Z_A is concatenated to z_t channel-wise (the source latent is spatially aligned
    with the target latent: same anatomy, same noise realisation).
    """

    def __init__(self, config: DenoiserConfig) -> None:
        super().__init__()
        self.config = config
        p2 = config.patch * config.patch
        chans = config.channels
        emb = config.time_embed_dim
        self.to_blocks = nn.PixelUnshuffle(config.patch)
        self.from_blocks = nn.PixelShuffle(config.patch)
        self.time_mlp = nn.Sequential(nn.Linear(emb, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.series_mlp: nn.Sequential | None = None
        if config.condition_features:
            # Added to the timestep embedding, so it reaches every block's FiLM. Zero-initialized
            # output: a denoiser warm-started from unconditioned weights starts where they were.
            last = nn.Linear(emb, emb)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            self.series_mlp = nn.Sequential(
                nn.Linear(config.condition_features, emb), nn.SiLU(), last
            )
        self.stem = nn.Conv2d(2 * config.latent_channels * p2, chans[0], 3, padding=1)
        self.down = nn.ModuleList(
            TimeBlock(chans[max(i - 1, 0)], chans[i], emb, config.groups) for i in range(len(chans))
        )
        self.mid = TimeBlock(chans[-1], chans[-1], emb, config.groups)
        self.up = nn.ModuleList(
            TimeBlock(
                chans[i] + (chans[i + 1] if i + 1 < len(chans) else chans[i]),
                chans[i],
                emb,
                config.groups,
            )
            for i in range(len(chans))
        )
        self.head = nn.Conv2d(chans[0], config.latent_channels * p2, 3, padding=1)
        # Zero-initialized output: the untrained denoiser predicts 0 (a common diffusion init).
        nn.init.zeros_(self.head.weight)
        if self.head.bias is not None:
            nn.init.zeros_(self.head.bias)

    def forward(
        self, z_t: Tensor, t: Tensor, condition: Tensor, series: Tensor | None = None
    ) -> Tensor:
        """z_t, condition: [N, C_z, h, w] (h, w multiples of `size_multiple`); t: [N] timesteps;
        series: [N, condition_features] (`series_condition_vector`), required when conditioned."""
        emb = self.time_mlp(timestep_embedding(t, self.config.time_embed_dim))
        if self.series_mlp is not None:
            if series is None:
                raise ValueError(
                    f"this denoiser is conditioned on {self.config.condition!r}: pass `series`"
                )
            emb = emb + self.series_mlp(series.to(emb.dtype))
        h = self.stem(self.to_blocks(torch.cat([z_t, condition], dim=1)))
        skips: list[Tensor] = []
        for i, block in enumerate(self.down):
            if i > 0:
                h = F.avg_pool2d(h, 2)
            h = block(h, emb)
            skips.append(h)
        h = self.mid(h, emb)
        for i in reversed(range(len(self.up))):
            if i + 1 < len(self.up):
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = self.up[i](torch.cat([skips[i], h], dim=1), emb)
        out: Tensor = self.from_blocks(self.head(F.silu(h, inplace=not torch.is_grad_enabled())))
        return out
