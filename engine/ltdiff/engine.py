"""`LTDiffEngine`: the node's Engine for LTDiff++ and for its UNet++-only regression ablation.

Per batch of slices (the volume is never on the device as a whole, so memory is bounded by
`batch_slices` whatever the series length):

    x   = normalize(HU)                           clip, scale (weights' HUNormalization)
    Z_A = E(x)                                    UNet++ encoder
    z_0 = DDIM(eps_theta(., t, s Z_A), z_T ~ N(0,I))  <= 10 steps, noise from per-slice generators
    Z_B'= Z_A + z_0 / s_r   (target "residual"; z_0 / s for target "latent")
    y   = HU(D(Z_B'))                             UNet++ decoder (mode "unetpp-regression": D(E(x)))

Reproducibility: slice k of a series draws all its noise from a CPU `torch.Generator` seeded with
`slice_seed(seed, k)`, so re-running a series (same seed, from its UID) reproduces it exactly, and
the result does not depend on the batch size or the device the noise lands on. Slices are padded
by mirror reflection to the network's size multiple and cropped back.

Precision (`Precision`, docs/METHOD.md "Inference"): bf16 autocast only where the hardware
computes bf16 natively: CUDA (fp16 where bf16 is unsupported) and CPUs with AVX512-BF16 or AMX
(2-3x faster than float32 there); float32 elsewhere. The denoiser, whose output is a residual
with errors relative to its own small size, runs in bf16. Of the encoder and decoder only the
non-linear UNet++ bodies do ("bf16", the default): their linear shortcuts, which carry the exact
pixel values, the space-to-depth input and the output sums stay float32, so the round trip moves
by hundredths of a HU (rounding the input itself to bf16 would cost several HU).
"denoiser-bf16" keeps E and D wholly float32; "float32" turns bf16 off. All modules use the
channels-last memory format.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Final, Literal, TypeVar, cast

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (the conventional alias)
from torch import Tensor, nn

from engine import __version__
from engine.envelope import ValidatedEnvelope
from engine.interface import (
    EngineError,
    EngineIdentity,
    FloatVolume,
    SeriesGeometry,
    check_output_buffer,
)
from engine.ltdiff.latent_diffusion import (
    NoiseSchedule,
    series_condition_vector,
    standard_latent,
)
from engine.ltdiff.sampler import DDIMSampler
from engine.ltdiff.weights import EngineMode, LTDiffWeights, load_weights
from engine.noise_level import measure_noise_hu

DEFAULT_BATCH_SLICES: Final = {"cpu": 4, "cuda": 16}
"""Slices per forward pass: ~0.5 GB of activations per 4 slices of 512 x 512 on the CPU model."""

_SEED_MIX: Final = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: spreads consecutive slice indices


def slice_seed(seed: int, index: int) -> int:
    """Seed of slice `index` of a series whose engine seed is `seed` (63-bit, non-negative)."""
    digest = hashlib.sha256(f"{seed & (2**64 - 1)}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


M = TypeVar("M", bound=nn.Module)


def _place(module: M, device: torch.device, memory_format: torch.memory_format) -> M:
    """module on device, in eval mode, with 4-D parameters in memory_format (the typing stubs of
    Module.to omit the memory_format keyword the runtime accepts)."""
    moved = cast(Any, module).to(device=device, memory_format=memory_format)
    return cast(M, moved).eval()


Precision = Literal["auto", "float32", "denoiser-bf16", "bf16"]
"""Where the engine computes in bf16 (fp16 on a GPU without bf16), always only where the hardware
does so natively (elsewhere float32): "float32" nowhere; "denoiser-bf16" the denoiser; "bf16" the
denoiser and the nested networks of the encoder and decoder, whose linear shortcuts, inputs and
output sums stay float32; "auto" is `AUTO_PRECISION`."""
PRECISIONS: Final[tuple[Precision, ...]] = ("auto", "float32", "denoiser-bf16", "bf16")
AUTO_PRECISION: Final[Precision] = "bf16"
"""What "auto" means (docs/METHOD.md "Inference": measured against float32 E and D)."""


def _cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: oneDNN then runs bf16 convolutions natively (elsewhere it emulates
    them, slower than float32). torch exposes the checks only as private helpers."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def denoiser_autocast_dtype(device: torch.device, precision: Precision) -> torch.dtype | None:
    """The autocast dtype of the denoiser on `device` (None: float32)."""
    if precision == "float32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and _cpu_has_native_bf16():
        return torch.bfloat16
    return None


def autoencoder_autocast_dtype(device: torch.device, precision: Precision) -> torch.dtype | None:
    """The autocast dtype of the encoder's and decoder's nested networks on `device` (None:
    float32); their linear shortcuts stay float32 whatever this returns (unetpp.py)."""
    resolved = AUTO_PRECISION if precision == "auto" else precision
    if resolved != "bf16":
        return None
    return denoiser_autocast_dtype(device, resolved)


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda if available else cpu; anything else as torch.device, checked to exist."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"device {device!r} configured but CUDA is not available")
    return dev


class LTDiffEngine:
    """LTDiff++ (or the UNet++ regression ablation) behind the Engine protocol.

    Holds only immutable things (modules in eval mode, the schedule); each call builds its own
    sampler and generators, so calls do not share state.
    """

    def __init__(
        self,
        weights: LTDiffWeights,
        *,
        weights_sha256: str,
        device: str = "cpu",
        batch_slices: int | None = None,
        num_steps: int | None = None,
        eta: float | None = None,
        precision: Precision = "auto",
    ) -> None:
        self._weights = weights
        self._device = resolve_device(device)
        self._batch = batch_slices or DEFAULT_BATCH_SLICES.get(self._device.type, 4)
        if self._batch < 1:
            raise EngineError(f"batch_slices must be >= 1, got {self._batch}")
        self._num_steps = num_steps or weights.sampling.num_steps
        self._eta = weights.sampling.eta if eta is None else eta
        if weights.sampling.distilled and (
            self._num_steps != weights.sampling.num_steps or self._eta != weights.sampling.eta
        ):
            raise EngineError(
                f"these weights hold a denoiser distilled to {weights.sampling.num_steps} "
                f"sampling step(s), eta {weights.sampling.eta:g}: it cannot run "
                f"{self._num_steps} step(s), eta {self._eta:g} (remove sample_steps / eta from "
                "the engine's configuration)"
            )
        if precision not in PRECISIONS:
            raise EngineError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self._memory_format = torch.channels_last
        self._amp_dtype = denoiser_autocast_dtype(self._device, precision)
        self._ae_amp_dtype = autoencoder_autocast_dtype(self._device, precision)
        self._autoencoder = _place(weights.build_autoencoder(), self._device, self._memory_format)
        self._denoiser = None
        self._schedule = None
        if weights.mode is EngineMode.LTDIFF:
            self._denoiser = _place(weights.build_denoiser(), self._device, self._memory_format)
            if weights.schedule_config is None:  # guaranteed by LTDiffWeights, kept for mypy
                raise EngineError("ltdiff weights without a schedule")
            self._schedule = NoiseSchedule.from_config(weights.schedule_config)
            # Validate the step count now, not on the first series.
            self._new_sampler()
        multiple = weights.autoencoder_config.size_multiple
        if weights.denoiser_config is not None:
            multiple = max(
                multiple, weights.autoencoder_config.patch * weights.denoiser_config.size_multiple
            )
        self._multiple = multiple
        ltdiff = weights.mode is EngineMode.LTDIFF
        self._identity = EngineIdentity(
            name="ltdiff++" if ltdiff else "unetpp-regression",
            version=__version__,
            weights_sha256=weights_sha256,
            source_kernel=weights.source_kernel,
            target_kernel=weights.target_kernel,
            settings=self._settings() if ltdiff else "",
        )

    def _settings(self) -> str:
        """The run-time sampling settings, part of the identity (they change the pixels)."""
        if self._weights.sampling.distilled:
            return f"distilled{self._num_steps}"
        return f"ddim{self._num_steps} eta{self._eta:g}"

    @classmethod
    def from_file(
        cls,
        path: Path,
        *,
        expected_kind: str | None = None,
        device: str = "cpu",
        batch_slices: int | None = None,
        num_steps: int | None = None,
        eta: float | None = None,
        precision: Precision = "auto",
    ) -> LTDiffEngine:
        weights, sha = load_weights(Path(path), expected_kind=expected_kind)
        return cls(
            weights,
            weights_sha256=sha,
            device=device,
            batch_slices=batch_slices,
            num_steps=num_steps,
            eta=eta,
            precision=precision,
        )

    @property
    def identity(self) -> EngineIdentity:
        return self._identity

    @property
    def envelope(self) -> ValidatedEnvelope | None:
        """The inputs these weights were validated on (None: weights that record none)."""
        return self._weights.envelope

    @property
    def weights(self) -> LTDiffWeights:
        return self._weights

    @property
    def batch_slices(self) -> int:
        return self._batch

    @property
    def denoiser_dtype(self) -> torch.dtype | None:
        """The dtype the denoiser computes in (bfloat16/float16 under autocast, else float32);
        None for the regression ablation, which has no denoiser."""
        if self._denoiser is None:
            return None
        return self._amp_dtype or torch.float32

    @property
    def autoencoder_dtype(self) -> torch.dtype:
        """The dtype the nested networks of the encoder and decoder compute in (their linear
        shortcuts are float32 always)."""
        return self._ae_amp_dtype or torch.float32

    def _new_sampler(self) -> DDIMSampler:
        if self._schedule is None or self._weights.denoiser_config is None:
            raise EngineError("this engine has no latent diffusion")
        try:
            return DDIMSampler.create(
                self._schedule,
                self._num_steps,
                self._weights.denoiser_config.prediction,
                eta=self._eta,
                spacing=self._weights.sampling.spacing,
            )
        except ValueError as exc:
            raise EngineError(f"sampler settings: {exc}") from exc

    def standardize(
        self,
        volume_hu: FloatVolume,
        geometry: SeriesGeometry,
        *,
        seed: int = 0,
        noise_hu: float | None = None,
        out: FloatVolume | None = None,
    ) -> FloatVolume:
        """Map a Br40d-like HU volume [slices, rows, cols] to a Bl64d-like one (float32 HU).

        noise_hu: the series' noise level when it was measured on more slices than `volume_hu`
        holds (training validates on a few slices of a series); None measures it here.
        out: as in `engine.interface.Engine`; may be `volume_hu` itself (the noise is measured,
        and each batch read, before any output is written over it)."""
        volume = np.asarray(volume_hu)
        if volume.ndim != 3 or min(volume.shape[1:]) < 2:
            raise EngineError(f"expected a volume [slices, rows, cols], got shape {volume.shape}")
        check_output_buffer(volume, out)
        if not np.all(np.isfinite(volume)):
            raise EngineError("the input volume contains NaN or infinite values")
        sampler = self._new_sampler() if self._denoiser is not None else None
        series = self._series_condition(volume, geometry, noise_hu)
        output = np.empty(volume.shape, dtype=np.float32) if out is None else out
        norm = self._weights.normalization
        with torch.inference_mode():
            for start in range(0, volume.shape[0], self._batch):
                chunk = norm.to_model(volume[start : start + self._batch].astype(np.float32))
                result = self._run_batch(chunk, start, seed, sampler, series)
                output[start : start + len(chunk)] = norm.to_hu(result)
        return output

    def _series_condition(
        self, volume: np.ndarray, geometry: SeriesGeometry, noise_hu: float | None
    ) -> list[float]:
        """The denoiser's series condition (pixel spacing, measured noise); [] when it has none.
        Slices are processed independently otherwise, so unconditioned weights ignore geometry."""
        cfg = self._weights.denoiser_config
        if self._denoiser is None or cfg is None or cfg.condition == "none":
            return []
        spacing = float(np.mean(geometry.pixel_spacing_mm))
        noise = measure_noise_hu(volume, spacing) if noise_hu is None else noise_hu
        if noise is None:
            raise EngineError(
                "cannot measure the noise level of this series (no slice holds enough soft "
                "tissue); these weights need it"
            )
        try:
            return series_condition_vector(cfg.condition, spacing, noise)
        except ValueError as exc:
            raise EngineError(str(exc)) from exc

    def _run_batch(
        self,
        chunk: np.ndarray,
        start: int,
        seed: int,
        sampler: DDIMSampler | None,
        series: list[float],
    ) -> np.ndarray:
        _, rows, cols = chunk.shape
        pad_r = (-rows) % self._multiple
        pad_c = (-cols) % self._multiple
        x = torch.from_numpy(np.ascontiguousarray(chunk)).to(self._device)[:, None]
        if pad_r or pad_c:
            mode = "reflect" if pad_r < rows and pad_c < cols else "replicate"
            x = F.pad(x, (0, pad_c, 0, pad_r), mode=mode)
        x = x.contiguous(memory_format=self._memory_format)
        latent = self._autoencoder.encode(x, self._ae_amp_dtype)
        if sampler is not None:
            with torch.autocast(
                device_type=self._device.type,
                dtype=self._amp_dtype or torch.bfloat16,
                enabled=self._amp_dtype is not None,
            ):
                latent = self._sample(latent, start, seed, sampler, series)
        y = self._autoencoder.decode(
            latent.float().contiguous(memory_format=self._memory_format), self._ae_amp_dtype
        )
        result: np.ndarray = y[:, 0, :rows, :cols].float().cpu().numpy()
        return result

    def _sample(
        self, latent: Tensor, start: int, seed: int, sampler: DDIMSampler, series: list[float]
    ) -> Tensor:
        if self._denoiser is None:
            raise EngineError("this engine has no latent diffusion")
        denoiser = self._denoiser
        cfg = denoiser.config
        z_a = latent.float()
        condition = z_a * self._weights.latent_scale
        series_t = (
            torch.tensor([series] * latent.shape[0], dtype=torch.float32, device=self._device)
            if series
            else None
        )
        generators = [
            torch.Generator(device="cpu").manual_seed(slice_seed(seed, start + k))
            for k in range(latent.shape[0])
        ]

        def model(z_t: Tensor, t: Tensor) -> Tensor:
            z_in = z_t.contiguous(memory_format=self._memory_format)
            out: Tensor = denoiser(z_in, t, condition, series_t)
            return out.float()

        z0 = sampler.sample(model, tuple(latent.shape), generators, device=self._device)
        scale = (
            self._weights.target_scale if cfg.target == "residual" else self._weights.latent_scale
        )
        return standard_latent(cfg.target, z_a, z0, scale)
