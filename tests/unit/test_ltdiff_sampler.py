"""Noise schedules (golden float64 values) and the stateless DDIM sampler."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from engine.ltdiff.latent_diffusion import NoiseSchedule, ScheduleConfig, alphas_cumprod, betas
from engine.ltdiff.sampler import DDIMSampler, ddim_timesteps, noise_like

# Golden abar_t values, T = 1000, in one place. Produced with plain Python floats (math.cos, a
# running product over a list), independently of numpy and of the code under test:
#   linear: beta_t = 1e-4 + (0.02 - 1e-4) * t / 999;            abar_t = prod_{s<=t} (1 - beta_s)
#   cosine: f(t) = cos^2((t/1000 + 0.008) / 1.008 * pi / 2); beta_t = min(1 - f(t+1)/f(t), 0.999)
# By hand: linear abar_0 = 1 - 1e-4 = 0.9999 and abar_1 = 0.9999 * (1 - (1e-4 + 0.0199/999)).
GOLDEN_ABAR = {
    "linear": {
        0: 0.9999,
        1: 0.9999 * (1.0 - (1e-4 + 0.0199 / 999.0)),
        499: 0.07858724288177821,
        999: 4.0358297653756754e-05,
    },
    "cosine": {
        0: 0.999958715775178,
        499: 0.4938435904406382,
        998: 2.4287669070348544e-06,
        999: 2.4287669070348567e-09,  # beta clipped to 0.999 at the last step
    },
}


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_matches_golden_float64_values(kind: str) -> None:
    abar = alphas_cumprod(ScheduleConfig(kind=kind))  # type: ignore[arg-type]
    assert abar.dtype == np.float64
    for t, want in GOLDEN_ABAR[kind].items():
        assert abar[t] == pytest.approx(want, rel=1e-12), f"{kind} abar_{t}"


def test_schedule_is_stored_float32_from_the_float64_computation() -> None:
    cfg = ScheduleConfig(kind="cosine")
    stored = NoiseSchedule.from_config(cfg).alphas_cumprod
    assert stored.dtype == torch.float32
    assert torch.equal(stored, torch.from_numpy(alphas_cumprod(cfg).astype(np.float32)))


def test_scaled_linear_betas_are_squares_of_a_linear_ramp() -> None:
    b = betas(ScheduleConfig(kind="scaled_linear", beta_start=1e-4, beta_end=0.0144))
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.0144)
    assert np.allclose(np.diff(np.sqrt(b)), (0.12 - 0.01) / 999)


def test_timesteps_come_from_one_pure_function() -> None:
    assert ddim_timesteps(1000, 1).tolist() == [999]
    assert ddim_timesteps(1000, 4).tolist() == [999, 749, 499, 249]
    assert ddim_timesteps(1000, 4, "leading").tolist() == [750, 500, 250, 0]
    assert ddim_timesteps(1000, 4, "linspace").tolist() == [999, 666, 333, 0]
    assert ddim_timesteps(1000, 10).tolist() == ddim_timesteps(1000, 10).tolist()


def test_more_than_ten_steps_is_refused() -> None:
    with pytest.raises(ValueError, match="at most 10"):
        DDIMSampler.create(NoiseSchedule.from_config(ScheduleConfig()), 11, "epsilon")


def _x0_model(target: torch.Tensor) -> object:
    """A 'network' that predicts the sample (x_0) `target` whatever its input."""

    def model(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        del t
        return target.expand_as(z)

    return model


def test_one_ddim_step_returns_the_x0_prediction() -> None:
    schedule = NoiseSchedule.from_config(ScheduleConfig())
    target = torch.full((1, 2, 4, 4), 0.37)
    sampler = DDIMSampler.create(schedule, 1, "sample")
    out = sampler.sample(
        _x0_model(target),  # type: ignore[arg-type]
        (1, 2, 4, 4),
        [torch.Generator().manual_seed(1)],
        device=torch.device("cpu"),
    )
    torch.testing.assert_close(out, target)


def test_one_ddim_step_with_epsilon_prediction_is_the_eq9_x0_estimate() -> None:
    schedule = NoiseSchedule.from_config(ScheduleConfig())
    sampler = DDIMSampler.create(schedule, 1, "epsilon")
    z_t = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(1, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    a = float(schedule.alphas_cumprod[999])
    want = (z_t - (1 - a) ** 0.5 * eps) / a**0.5
    torch.testing.assert_close(sampler.step(eps, 999, -1, z_t, None), want)


def test_ddim_step_with_eta_zero_is_deterministic_eq12() -> None:
    schedule = NoiseSchedule.from_config(ScheduleConfig())
    sampler = DDIMSampler.create(schedule, 2, "epsilon", eta=0.0)
    z_t, eps = torch.ones(1, 1, 1, 1), torch.full((1, 1, 1, 1), 0.5)
    a_t, a_p = (float(schedule.alphas_cumprod[i]) for i in (999, 499))
    x0 = (1.0 - (1 - a_t) ** 0.5 * 0.5) / a_t**0.5
    want = a_p**0.5 * x0 + (1 - a_p) ** 0.5 * 0.5
    got = sampler.step(eps, 999, 499, z_t, None)
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_sampler_is_stateless_and_immutable() -> None:
    schedule = NoiseSchedule.from_config(ScheduleConfig(num_train_timesteps=100))
    sampler = DDIMSampler.create(schedule, 4, "v", eta=1.0)
    before = dataclasses.astuple(sampler)[1:]

    def model(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.3 * z + t.float().view(-1, 1, 1, 1) / 100

    runs = [
        sampler.sample(
            model,
            (2, 1, 4, 4),
            [torch.Generator().manual_seed(s) for s in (5, 6)],
            device=torch.device("cpu"),
        )
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1]), "same generators must give the same sample"
    assert dataclasses.astuple(sampler)[1:] == before
    with pytest.raises(dataclasses.FrozenInstanceError):
        sampler.eta = 0.0  # type: ignore[misc]


def test_each_sample_draws_only_from_its_own_generator() -> None:
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    batch = noise_like((3, 2, 4, 4), gens, device=torch.device("cpu"))
    alone = noise_like((1, 2, 4, 4), [torch.Generator().manual_seed(2)], device=torch.device("cpu"))
    assert torch.equal(batch[1:2], alone)
    assert not torch.equal(batch[0], batch[1])


def test_stochastic_ddim_needs_noise() -> None:
    sampler = DDIMSampler.create(NoiseSchedule.from_config(ScheduleConfig()), 2, "v", eta=1.0)
    with pytest.raises(ValueError, match="needs noise"):
        sampler.step(torch.zeros(1), 999, 499, torch.zeros(1), None)


def test_sample_from_a_given_z_t_is_the_sample_of_the_same_draws() -> None:
    """Distillation runs the teacher from its own z_T (`sample_from`); the engine draws z_T from
    per-slice generators (`sample`). Both are one reverse process."""
    sampler = DDIMSampler.create(NoiseSchedule.from_config(ScheduleConfig()), 3, "v")

    def model(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.3 * z + t[:, None, None, None].float() / 1000.0

    shape = (2, 2, 4, 4)
    drawn = sampler.sample(
        model, shape, [torch.Generator().manual_seed(s) for s in (4, 5)], device=torch.device("cpu")
    )
    z_t = noise_like(
        shape, [torch.Generator().manual_seed(s) for s in (4, 5)], device=torch.device("cpu")
    )
    assert torch.equal(sampler.sample_from(model, z_t), drawn)
    stochastic = DDIMSampler.create(NoiseSchedule.from_config(ScheduleConfig()), 2, "v", eta=1.0)
    with pytest.raises(ValueError, match="noise source"):
        stochastic.sample_from(model, z_t)
