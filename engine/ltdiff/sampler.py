"""DDIM sampling (Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models") in few steps.

The model predicts, the sampler steps. A `DDIMSampler` is an immutable value: the schedule's abar
(float32, computed in float64), the timesteps (one array from the pure function
`ddim_timesteps`), the prediction type and eta. It keeps no counter and no noise: every random draw
comes from the generators the caller passes, one per sample, so the output of a sample depends only
on its own generator (not on how samples are batched). Build one per job; sharing is harmless
since nothing mutates, but there is nothing to gain either.

One DDIM update from t to the previous timestep t' (DDIM eq. 12, with sigma from eq. 16):

    z0_hat  = (z_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t)                    "predicted x_0"
    sigma   = eta * sqrt((1 - abar_t') / (1 - abar_t)) * sqrt(1 - abar_t / abar_t')
    z_t'    = sqrt(abar_t') z0_hat + sqrt(1 - abar_t' - sigma^2) eps_hat + sigma * noise

and after the last timestep abar_t' = 1, so the final update returns z0_hat: with a single step
the sampler returns the network's z_0 prediction at t = T - 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from engine.ltdiff.latent_diffusion import NoiseSchedule, Prediction, split_prediction

TimestepSpacing = Literal["trailing", "leading", "linspace"]
MAX_STEPS = 10
"""The node's latency budget: no more than 10 network evaluations per slice."""

ModelFn = Callable[[Tensor, Tensor], Tensor]
"""(z_t [N, C, h, w], t [N] int64) -> network output shaped like z_t (condition bound in)."""


def ddim_timesteps(
    num_train_timesteps: int, num_steps: int, spacing: TimestepSpacing = "trailing"
) -> npt.NDArray[np.int64]:
    """The descending timesteps a sampler visits, from one pure function.

    trailing: T-1, T-1-k, ... (k = T / steps): starts at the last, noisiest timestep, so sampling
        starts from (almost) pure noise however few the steps (Lin et al. 2024, "Common Diffusion
        Noise Schedules and Sample Steps are Flawed", table 2).
    leading: 0, k, 2k, ... reversed (DDIM's original choice; skips the noisiest part for few steps).
    linspace: rounded linspace from T-1 to 0.
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in 1..{num_train_timesteps}, got {num_steps}")
    if spacing == "trailing":
        ts = np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps)) - 1
    elif spacing == "leading":
        ts = (np.arange(num_steps) * (num_train_timesteps // num_steps))[::-1]
    elif spacing == "linspace":
        ts = np.round(np.linspace(num_train_timesteps - 1, 0, num_steps))
    else:
        raise ValueError(f"spacing must be trailing, leading or linspace, got {spacing!r}")
    return np.ascontiguousarray(ts, dtype=np.int64)


def noise_like(
    shape: Sequence[int],
    generators: Sequence[torch.Generator],
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal noise [N, ...], sample n drawn from generators[n] (on the CPU, then moved),
    so the numbers are the same on every device and for every batch composition."""
    if len(generators) != shape[0]:
        raise ValueError(f"need one generator per sample: {len(generators)} for {shape[0]}")
    per_sample = tuple(shape[1:])
    draws = [torch.randn(per_sample, generator=g, dtype=torch.float32) for g in generators]
    return torch.stack(draws).to(device=device, dtype=dtype)


@dataclass(frozen=True)
class DDIMSampler:
    """A stateless DDIM sampler (module docstring). Build with `DDIMSampler.create`."""

    alphas_cumprod: Tensor
    timesteps: tuple[int, ...]
    prediction: Prediction
    eta: float = 0.0

    @classmethod
    def create(
        cls,
        schedule: NoiseSchedule,
        num_steps: int,
        prediction: Prediction,
        *,
        eta: float = 0.0,
        spacing: TimestepSpacing = "trailing",
    ) -> DDIMSampler:
        if num_steps > MAX_STEPS:
            raise ValueError(f"at most {MAX_STEPS} sampling steps, got {num_steps}")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        ts = ddim_timesteps(schedule.num_train_timesteps, num_steps, spacing)
        return cls(schedule.alphas_cumprod, tuple(int(t) for t in ts), prediction, eta)

    def _abar(self, t: int, like: Tensor) -> Tensor:
        # abar of timestep t; t = -1 means "after the last step", where abar = 1 (x_0 itself).
        value = 1.0 if t < 0 else float(self.alphas_cumprod[t])
        return torch.tensor(value, dtype=torch.float32, device=like.device)

    def step(
        self, model_output: Tensor, t: int, t_prev: int, z_t: Tensor, noise: Tensor | None
    ) -> Tensor:
        """One DDIM update z_t -> z_{t_prev} (module docstring). t_prev = -1 ends at z_0.

        noise: standard normal like z_t, required when eta > 0 and t_prev >= 0.
        """
        z_t32 = z_t.float()
        a_t = self._abar(t, z_t32)
        a_prev = self._abar(t_prev, z_t32)
        z0, eps = split_prediction(self.prediction, model_output.float(), z_t32, a_t)
        if t_prev < 0:
            return z0
        sigma = self.eta * ((1.0 - a_prev) / (1.0 - a_t)).sqrt() * (1.0 - a_t / a_prev).sqrt()
        direction = (1.0 - a_prev - sigma**2).clamp(min=0.0).sqrt() * eps  # DDIM eq. 12, middle
        z_prev = a_prev.sqrt() * z0 + direction
        if self.eta > 0.0:
            if noise is None:
                raise ValueError("eta > 0 needs noise for every step but the last")
            z_prev = z_prev + sigma * noise.float()
        return z_prev

    def sample(
        self,
        model: ModelFn,
        shape: Sequence[int],
        generators: Sequence[torch.Generator],
        *,
        device: torch.device,
    ) -> Tensor:
        """Run the reverse process from z_T ~ N(0, I) to z_0, float32 [N, ...] on `device`."""
        z_noise = noise_like(shape, generators, device=device)

        def fresh_noise() -> Tensor:
            return noise_like(shape, generators, device=device)

        return self.sample_from(model, z_noise, fresh_noise)

    def sample_from(
        self, model: ModelFn, z_noise: Tensor, noise: Callable[[], Tensor] | None = None
    ) -> Tensor:
        """The reverse process from a given z_T (`z_noise`, float32 [N, ...]); `noise()` gives
        the fresh standard normal draws eta > 0 needs (none with eta = 0: the result is then a
        deterministic function of z_T, which is what distillation regresses on)."""
        z = z_noise.float()
        steps = [*self.timesteps, -1]
        for t, t_prev in pairwise(steps):
            t_batch = torch.full((z.shape[0],), t, dtype=torch.int64, device=z.device)
            out = model(z, t_batch)
            need_noise = self.eta > 0.0 and t_prev >= 0
            if need_noise and noise is None:
                raise ValueError("eta > 0 needs a noise source")
            z = self.step(out, t, t_prev, z, noise() if need_noise and noise else None)
        return z
