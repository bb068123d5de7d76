"""Train LTDiff++ (and its UNet++ regression ablation) from folders of paired DICOM series.

    ltdiff-node train ltdiff --phase 1 --data DIR --out runs/p1 ...          autoencoder
    ltdiff-node train ltdiff --phase 2 --data DIR --init runs/p1/ckpt.pt --out runs/p2
    ltdiff-node train ltdiff --phase 3 --data DIR --init runs/p2/ckpt.pt --out runs/p3 \
        --export engine/weights/ltdiff-br40d-bl64d.safetensors                  fine-tune + export
    ltdiff-node train ltdiff --phase regression --data DIR --out runs/reg --export reg.safetensors

Phases (one readable loop, `train`, driven by a `TrainConfig`; the per-phase objective is one
`nn.Module`, `Objective`, so DDP wraps exactly what is trained):

1. The UNet++ autoencoder on every image of both kernels (patches), reconstruction with deep
   supervision: the mean over the decoder's heads of an L1 (or L2) loss. Not the paper's BCE+Dice:
   those are segmentation losses for label maps in [0, 1]; here the target is an image in HU.
2. The latent denoiser with the autoencoder frozen, on aligned pairs (A = source, B = target):
   z_0 = s_r (E(B) - E(A)) (the residual target; s E(B) with --diffusion-target latent),
   z_t = q(z_0, t, eps); the network predicts eps / z_0 / v (`Prediction`) conditioned on
   s E(A), with
       L = L_denoise + lambda_latent ||Z_A' - Z_B||^2 + lambda_image ||D(Z_A') - B||^2
   where Z_A' is the standard latent made from the network's z_0 estimate: the paper's combined
   objective beside the denoising loss (the latent term is measured in scaled units). The
   scales s = 1/SD(E(B)) and s_r = 1/SD(E(B) - E(A)) are measured at the start of phase 2.
3. Joint fine-tuning of the denoiser and the decoder (encoder frozen: the latent space the
   denoiser learned stays put) with the phase-2 loss plus the decoder's reconstruction of real
   target latents; then export. `--steps 0` exports the phase-2 result unchanged.
regression. The ablation of the paper's Table I: the same autoencoder trained end to end to map A
   to B directly (deep supervision on every head), exported as kind "unetpp-regression".

Runs are resumable (`OUT/ckpt.pt`, written atomically every `--ckpt-interval` steps and at the
end; a run restarts from it unless `--no-resume`), log to `OUT/metrics.jsonl`, use explicit
seeds, bf16/fp16 autocast on CUDA, and data parallelism under `torchrun` (DDP, the process group
initialized from the environment, a DistributedSampler per rank, only rank 0 writes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F  # noqa: N812 (the conventional alias)
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from engine import __version__
from engine.interface import SeriesGeometry
from engine.ltdiff.engine import LTDiffEngine, denoiser_autocast_dtype, resolve_device
from engine.ltdiff.latent_diffusion import (
    DenoiserConfig,
    DiffusionTarget,
    LatentDenoiser,
    NoiseSchedule,
    Prediction,
    ScheduleConfig,
    ScheduleKind,
    SeriesCondition,
    diffusion_x0,
    q_sample,
    series_condition_vector,
    split_prediction,
    standard_latent,
    training_target,
)
from engine.ltdiff.sampler import DDIMSampler
from engine.ltdiff.unetpp import UNetPlusPlusAutoencoder, UNetPPConfig
from engine.ltdiff.weights import (
    MAX_SHIPPED_BYTES,
    EngineMode,
    HUNormalization,
    LTDiffWeights,
    SamplingConfig,
    load_weights,
    save_weights,
    unwrap_state,
)
from training.ltdiff_data import (
    PairedSlices,
    PatchPairs,
    load_paired_slices,
    spread_indices,
)
from training.pairs import DEFAULT_SOURCE_KERNEL, DEFAULT_TARGET_KERNEL

Phase = Literal["1", "2", "3", "regression", "distill"]
ReconLoss = Literal["l1", "l2", "l1+l2"]
AmpMode = Literal["bf16", "fp16", "off"]
CKPT_FORMAT = "ltdiff-node/train-checkpoint/1"
CKPT_NAME = "ckpt.pt"
METRICS_NAME = "metrics.jsonl"


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on. Architecture fields apply where a model is created (phase 1,
    regression, the denoiser in phase 2); later phases take the rest from their --init checkpoint.
    """

    phase: Phase
    data: tuple[Path, ...]
    out_dir: Path
    init: Path | None = None
    export: Path | None = None
    holdout: tuple[str, ...] = ("S004", "S005")
    source_kernel: str = DEFAULT_SOURCE_KERNEL
    target_kernel: str = DEFAULT_TARGET_KERNEL
    steps: int = 2000
    batch_size: int = 8
    patch: int = 128
    lr: float = 2e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    recon_loss: ReconLoss = "l1"
    lambda_latent: float = 1.0
    lambda_image: float = 1.0
    lambda_recon: float = 1.0
    seed: int = 1337
    device: str = "auto"
    amp: AmpMode = "bf16"
    threads: int | None = None
    log_interval: int = 10
    eval_interval: int = 200
    ckpt_interval: int = 100
    val_slices: int = 2
    max_train_slices: int | None = None
    resume: bool = True
    progress: bool = True
    latent_channels: int = 8
    encoder_channels: tuple[int, ...] = (16, 32)
    decoder_channels: tuple[int, ...] = (16, 32, 64)
    denoiser_channels: tuple[int, ...] = (32, 64, 128)
    # 1 = the latent's resolution; 2 made the generated grain too coarse (docs/MODEL_CARD.md).
    denoiser_patch: int = 1
    schedule: ScheduleKind = "cosine"
    prediction: Prediction = "v"
    diffusion_target: DiffusionTarget = "residual"
    # The clinical-envelope run and later: the denoiser knows the series' spacing and noise.
    condition: SeriesCondition = "spacing-noise"
    sample_steps: int = 8
    sample_eta: float = 0.0
    # Phase "distill": the teacher's DDIM steps (None: the --init file's own setting) and the
    # student's steps (the exported setting).
    teacher_steps: int | None = None
    student_steps: int = 1
    # bf16 autocast on a CPU that computes bf16 natively (AVX512-BF16 / AMX); off: float32.
    cpu_amp: bool = False
    command: str = field(default="", compare=False)

    def to_json(self) -> str:
        d = asdict(self)
        return json.dumps(d, sort_keys=True, default=str)


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr at the last step (nanoGPT)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(config.steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    floor = config.lr * config.min_lr_ratio
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - floor)


def reconstruction_loss(heads: Sequence[Tensor], target: Tensor, kind: ReconLoss) -> Tensor:
    """Deep supervision: the mean over heads of L1, L2 or their sum against the target image."""
    losses = []
    for h in heads:
        h32 = h.float()
        if kind == "l1":
            losses.append(F.l1_loss(h32, target))
        elif kind == "l2":
            losses.append(F.mse_loss(h32, target))
        else:
            losses.append(F.l1_loss(h32, target) + F.mse_loss(h32, target))
    return torch.stack(losses).mean()


class Objective(nn.Module):
    """The loss of one phase as a module holding the models it uses (DDP wraps this)."""

    def __init__(
        self,
        phase: Phase,
        *,
        config: TrainConfig,
        autoencoder: UNetPlusPlusAutoencoder,
        denoiser: LatentDenoiser | None = None,
        schedule: NoiseSchedule | None = None,
        latent_scale: float = 1.0,
        target_scale: float = 1.0,
        teacher: Teacher | None = None,
    ) -> None:
        super().__init__()
        self.phase = phase
        self.teacher = teacher
        # A submodule, so that .to(device) moves it; frozen below.
        self.teacher_denoiser = teacher.denoiser if teacher is not None else None
        # Phase distill: the sampler the student runs (the one the exported weights record).
        self.student_sampler: DDIMSampler | None = None
        if phase == "distill" and schedule is not None and denoiser is not None:
            self.student_sampler = DDIMSampler.create(
                schedule, config.student_steps, denoiser.config.prediction
            )
        self.config = config
        self.autoencoder = autoencoder
        self.denoiser = denoiser
        self.schedule = schedule
        self.latent_scale = latent_scale
        self.target_scale = target_scale
        frozen: list[nn.Module] = []
        if phase in ("2", "distill"):
            frozen = [autoencoder]
            if self.teacher_denoiser is not None:
                frozen.append(self.teacher_denoiser)
        elif phase == "3":
            frozen = [autoencoder.encoder, autoencoder.to_latent, autoencoder.encoder_shortcut]
        for module in frozen:
            module.requires_grad_(False)

    def series_vectors(self, series: Tensor | None) -> Tensor | None:
        """[N, 2] (pixel spacing, noise) -> the denoiser's condition vectors (None if it has
        none): the same `series_condition_vector` the engine applies at inference."""
        if self.denoiser is None or self.denoiser.config.condition == "none":
            return None
        if series is None:
            raise ValueError("a conditioned denoiser needs each patch's series (spacing, noise)")
        kind = self.denoiser.config.condition
        rows = [series_condition_vector(kind, float(s), float(n)) for s, n in series.tolist()]
        return torch.tensor(rows, dtype=torch.float32, device=series.device)

    def forward(
        self, a: Tensor, b: Tensor, series: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        cfg = self.config
        if self.phase == "1":
            loss = reconstruction_loss(self.autoencoder(a), a, cfg.recon_loss)
            return loss, {"recon": loss.detach()}
        if self.phase == "regression":
            loss = reconstruction_loss(self.autoencoder(a), b, cfg.recon_loss)
            return loss, {"regression": loss.detach()}
        if self.denoiser is None or self.schedule is None:
            raise RuntimeError(f"phase {self.phase} needs a denoiser and a schedule")
        if self.phase == "distill":
            return self._distill(a, series)
        target = self.denoiser.config.target
        scale = self.target_scale if target == "residual" else self.latent_scale
        with torch.no_grad():
            latent_a = self.autoencoder.encode(a).float()
            latent_b = self.autoencoder.encode(b).float()
        x0 = diffusion_x0(target, latent_a, latent_b, scale)
        t = torch.randint(0, self.schedule.num_train_timesteps, (a.shape[0],), device=a.device)
        noise = torch.randn_like(x0)
        z_t = q_sample(self.schedule, x0, t, noise)
        abar = self.schedule.abar(t, x0)
        pred = self.denoiser.config.prediction
        vectors = self.series_vectors(series)
        out = self.denoiser(z_t, t, latent_a * self.latent_scale, vectors).float()
        l_denoise = F.mse_loss(out, training_target(pred, x0, noise, abar))
        x0_hat, _ = split_prediction(pred, out, z_t, abar)
        l_latent = F.mse_loss(x0_hat, x0)  # ||Z_A' - Z_B||^2 in the diffusion's scaled units
        z_b_hat = standard_latent(target, latent_a, x0_hat, scale)  # Z_A': predicted Z_B
        l_image = F.mse_loss(self.autoencoder.decode(z_b_hat).float(), b)
        loss = l_denoise + cfg.lambda_latent * l_latent + cfg.lambda_image * l_image
        metrics = {"denoise": l_denoise.detach(), "latent": l_latent.detach()}
        metrics["image"] = l_image.detach()
        if self.phase == "3":
            heads = self.autoencoder.decode_heads(latent_b)
            l_recon = reconstruction_loss(heads, b, cfg.recon_loss)
            loss = loss + cfg.lambda_recon * l_recon
            metrics["recon"] = l_recon.detach()
        return loss, metrics

    def _distill(self, a: Tensor, series: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        """One-step distillation (Luhman & Luhman 2021, "Knowledge distillation in iterative
        generative models"): from the same z_T ~ N(0, I), the student's `student_steps`-step
        DDIM sample regresses onto the teacher's deterministic (eta 0) DDIM sample. The teacher's
        sample is a deterministic function of z_T and Z_A, so the regression has one answer per
        input and does not average the texture away: a new z_T gives a new grain, as in the
        teacher (docs/METHOD.md, "One-step sampling")."""
        teacher = self.teacher_denoiser
        student_sampler = self.student_sampler
        if self.denoiser is None or student_sampler is None:
            raise RuntimeError("phase distill needs a student and its sampler")
        if self.teacher is None or teacher is None:
            raise RuntimeError("phase distill needs a teacher")
        cfg, student = self.config, self.denoiser
        target = student.config.target
        scale = self.target_scale if target == "residual" else self.latent_scale
        vectors = self.series_vectors(series)
        with torch.no_grad():
            latent_a = self.autoencoder.encode(a).float()
            condition = latent_a * self.latent_scale
            z_noise = torch.randn_like(latent_a)

            def teacher_fn(z_t: Tensor, t: Tensor) -> Tensor:
                out: Tensor = teacher(z_t, t, condition, vectors)
                return out.float()

            x0_teacher = self.teacher.sampler.sample_from(teacher_fn, z_noise)

        def student_fn(z_t: Tensor, t: Tensor) -> Tensor:
            out: Tensor = student(z_t, t, condition, vectors)
            return out.float()

        x0_student = student_sampler.sample_from(student_fn, z_noise)
        l_latent = F.mse_loss(x0_student, x0_teacher)
        loss = cfg.lambda_latent * l_latent
        metrics = {"latent": l_latent.detach()}
        if cfg.lambda_image > 0:
            with torch.no_grad():
                image_teacher = self.autoencoder.decode(
                    standard_latent(target, latent_a, x0_teacher, scale)
                ).float()
            image = self.autoencoder.decode(standard_latent(target, latent_a, x0_student, scale))
            l_image = F.mse_loss(image.float(), image_teacher)
            loss = loss + cfg.lambda_image * l_image
            metrics["image"] = l_image.detach()
        return loss, metrics


@dataclass(frozen=True)
class Teacher:
    """The frozen denoiser a student is distilled from, and the sampler it runs (eta 0)."""

    denoiser: LatentDenoiser
    sampler: DDIMSampler
    weights_sha256: str


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> DistContext:
    """Initialize torch.distributed from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT) when WORLD_SIZE > 1: NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if world <= 1:
        return DistContext(0, 1, dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    rank = dist.get_rank()
    if dev.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    return DistContext(rank, dist.get_world_size(), dev)


def _batches(
    dataset: PatchPairs, sampler: DistributedSampler[Any], batch: int, start_step: int
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Batches for steps start_step, start_step + 1, ...: epochs of len(sampler) // batch steps,
    resumed exactly at start_step (indices of a DistributedSampler epoch are a pure function of
    its seed and epoch)."""
    steps_per_epoch = max(len(sampler) // batch, 1)
    step = start_step
    while True:
        epoch, offset = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        indices = list(sampler)
        for k in range(offset, steps_per_epoch):
            items = [dataset[i] for i in indices[k * batch : (k + 1) * batch]]
            a = torch.stack([item[0] for item in items])
            b = torch.stack([item[1] for item in items])
            series = torch.stack([item[2] for item in items])
            yield a, b, series
        step = (epoch + 1) * steps_per_epoch


def _load_checkpoint(path: Path) -> dict[str, Any]:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise ValueError(f"{path}: not an LTDiff++ training checkpoint ({CKPT_FORMAT})")
    return cast(dict[str, Any], ckpt)


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


@dataclass
class Models:
    autoencoder: UNetPlusPlusAutoencoder
    denoiser: LatentDenoiser | None
    schedule_config: ScheduleConfig | None
    latent_scale: float
    target_scale: float
    history: list[dict[str, object]]
    teacher: Teacher | None = None


def _build_models(config: TrainConfig, train: PairedSlices, device: torch.device) -> Models:
    """Fresh models for phase 1 / regression; for phases 2 and 3 the --init checkpoint's."""
    if config.phase in ("1", "regression"):
        ae_cfg = UNetPPConfig(
            latent_channels=config.latent_channels,
            encoder_channels=config.encoder_channels,
            decoder_channels=config.decoder_channels,
        )
        return Models(UNetPlusPlusAutoencoder(ae_cfg), None, None, 1.0, 1.0, [])
    if config.init is None:
        raise ValueError(f"phase {config.phase} needs --init (the previous phase's checkpoint)")
    if config.phase == "distill":
        return _models_for_distillation(config)
    if config.init.suffix == ".safetensors":
        return _models_from_weights(config)
    init = _load_checkpoint(config.init)
    want = {"2": "1", "3": "2"}[config.phase]
    if init["phase"] not in (want, config.phase):
        raise ValueError(
            f"--init {config.init} is a phase-{init['phase']} checkpoint; phase {config.phase} "
            f"starts from phase {want}"
        )
    ae = UNetPlusPlusAutoencoder(UNetPPConfig.from_dict(json.loads(init["autoencoder_config"])))
    ae.load_state_dict(init["autoencoder"], strict=True)
    history = list(json.loads(init["history"]))
    if config.phase == "3":
        den = LatentDenoiser(DenoiserConfig.from_dict(json.loads(init["denoiser_config"])))
        den.load_state_dict(init["denoiser"], strict=True)
        sch = ScheduleConfig.from_dict(json.loads(init["schedule_config"]))
        scales = float(init["latent_scale"]), float(init["target_scale"])
        return Models(ae, den, sch, *scales, history)
    den_cfg = DenoiserConfig(
        latent_channels=ae.config.latent_channels,
        patch=config.denoiser_patch,
        channels=config.denoiser_channels,
        prediction=config.prediction,
        target=config.diffusion_target,
        condition=config.condition,
    )
    s, s_r = measure_latent_scales(ae, train, config, device)
    schedule = ScheduleConfig(kind=config.schedule)
    return Models(ae, LatentDenoiser(den_cfg), schedule, s, s_r, history)


def _models_from_weights(config: TrainConfig) -> Models:
    """Phase 2 or 3 warm-started from an exported LTDiff++ weights file (e.g. the shipped one):
    its autoencoder, schedule and latent scales as they are (the latent space does not move),
    its denoiser with the series condition of `config` added. A condition the file lacks starts
    at zero (`LatentDenoiser.series_mlp`), so training starts from the file's behaviour."""
    if config.init is None:
        raise ValueError("no --init weights file")
    weights, sha = load_weights(config.init, expected_kind=EngineMode.LTDIFF.value)
    if weights.denoiser_config is None or weights.denoiser_state is None:
        raise ValueError(f"{config.init}: holds no latent denoiser")
    ae = weights.build_autoencoder()
    old = weights.denoiser_config
    if old.condition not in ("none", config.condition):
        raise ValueError(
            f"{config.init}: denoiser is conditioned on {old.condition!r}, not {config.condition!r}"
        )
    den = LatentDenoiser(replace(old, condition=config.condition))
    state = dict(weights.denoiser_state)
    missing, unexpected = den.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("series_mlp.") for k in missing):
        raise ValueError(
            f"{config.init}: denoiser tensors do not fit: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}"
        )
    history = list(cast(list[dict[str, object]], weights.training.get("history", [])))
    history.append({"phase": "init", "weights": str(config.init), "sha256": sha})
    if weights.schedule_config is None:
        raise ValueError(f"{config.init}: holds no schedule")
    return Models(
        ae, den, weights.schedule_config, weights.latent_scale, weights.target_scale, history
    )


def _models_for_distillation(config: TrainConfig) -> Models:
    """Phase distill: the --init weights file is the teacher; the student starts as a copy of
    its denoiser (same architecture, so inference code and cost per evaluation do not change);
    autoencoder, schedule and scales are the teacher's and stay frozen."""
    if config.init is None or config.init.suffix != ".safetensors":
        raise ValueError("phase distill needs --init TEACHER.safetensors (LTDiff++ weights)")
    weights, sha = load_weights(config.init, expected_kind=EngineMode.LTDIFF.value)
    if weights.denoiser_config is None or weights.denoiser_state is None:
        raise ValueError(f"{config.init}: holds no latent denoiser")
    if weights.schedule_config is None:
        raise ValueError(f"{config.init}: holds no schedule")
    if weights.sampling.distilled:
        raise ValueError(f"{config.init}: is itself a distilled student; distill from its teacher")
    if config.student_steps >= (config.teacher_steps or weights.sampling.num_steps):
        raise ValueError("--student-steps must be fewer than the teacher's steps")
    teacher_den = weights.build_denoiser().eval()
    student = weights.build_denoiser()
    schedule = NoiseSchedule.from_config(weights.schedule_config)
    sampler = DDIMSampler.create(
        schedule,
        config.teacher_steps or weights.sampling.num_steps,
        weights.denoiser_config.prediction,
        eta=0.0,
        spacing=weights.sampling.spacing,
    )
    history = list(cast(list[dict[str, object]], weights.training.get("history", [])))
    history.append(
        {
            "phase": "teacher",
            "weights": str(config.init),
            "sha256": sha,
            "teacher_steps": len(sampler.timesteps),
        }
    )
    return Models(
        weights.build_autoencoder(),
        student,
        weights.schedule_config,
        weights.latent_scale,
        weights.target_scale,
        history,
        Teacher(teacher_den, sampler, sha),
    )


def measure_latent_scales(
    ae: UNetPlusPlusAutoencoder, train: PairedSlices, config: TrainConfig, device: torch.device
) -> tuple[float, float]:
    """(s, s_r) = 1 / SD of E(B) and of E(B) - E(A) over fixed training patches (latent
    diffusion's scale factor), so the diffusion sees unit-variance data. The same on every rank."""
    data = PatchPairs(train, patch=config.patch, length=32, mode="pairs", seed=config.seed + 7)
    ae = ae.to(device).eval()
    latents, residuals = [], []
    with torch.no_grad():
        for i in range(0, len(data), 8):
            items = [data[j] for j in range(i, min(i + 8, len(data)))]
            a = torch.stack([item[0] for item in items]).to(device)
            b = torch.stack([item[1] for item in items]).to(device)
            z_a, z_b = ae.encode(a).float(), ae.encode(b).float()
            latents.append(z_b.flatten())
            residuals.append((z_b - z_a).flatten())
    sd = float(torch.cat(latents).std())
    sd_r = float(torch.cat(residuals).std())
    return 1.0 / max(sd, 1e-6), 1.0 / max(sd_r, 1e-6)


def _weights_for_export(
    config: TrainConfig,
    models: Models,
    train: PairedSlices,
    mode: EngineMode,
    *,
    with_envelope: bool = True,
) -> LTDiffWeights:
    den = models.denoiser
    return LTDiffWeights(
        mode=mode,
        autoencoder_config=models.autoencoder.config,
        autoencoder_state=unwrap_state(models.autoencoder),
        source_kernel=train.source_kernel,
        target_kernel=train.target_kernel,
        denoiser_config=den.config if den is not None and mode is EngineMode.LTDIFF else None,
        denoiser_state=unwrap_state(den) if den is not None and mode is EngineMode.LTDIFF else None,
        schedule_config=models.schedule_config if mode is EngineMode.LTDIFF else None,
        sampling=(
            SamplingConfig(num_steps=config.student_steps, distilled=True)
            if config.phase == "distill"
            else SamplingConfig(num_steps=config.sample_steps, eta=config.sample_eta)
        ),
        latent_scale=models.latent_scale,
        target_scale=models.target_scale,
        normalization=HUNormalization(),
        training={
            "history": models.history,
            "data": train.summary(),
            "holdout": list(config.holdout),
            "code_version": __version__,
        },
        # What the model has seen; the held-out subjects are listed as validated on.
        envelope=train.envelope(config.holdout) if with_envelope else None,
    )


def _highpass_sd(hu: np.ndarray, mask: np.ndarray) -> float:
    """SD (HU) of the image minus its 3x3 mean inside mask, [slices, rows, cols]: a crude
    fine-grain texture measure (a smoothed conditional mean scores < 1 against the target)."""
    rows, cols = hu.shape[-2:]
    padded = np.pad(hu, ((0, 0), (1, 1), (1, 1)), mode="edge")
    local = (
        sum(
            padded[:, 1 + dy : 1 + dy + rows, 1 + dx : 1 + dx + cols]
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
        )
        / 9.0
    )
    return float(np.std((hu - local)[mask]))


def validate(
    config: TrainConfig, models: Models, val: PairedSlices, device: torch.device
) -> dict[str, float]:
    """Whole held-out slices: RMSE (HU) against the target and the ratio of fine-grain SD (>1:
    grainier than the target, <1: smoother). Phases 2/3 and regression run the engine's own code
    path (LTDiffEngine) on an in-memory export; phase 1 measures the round trip of both kernels."""
    norm = HUNormalization()
    indices = spread_indices(len(val), config.val_slices)
    if not indices:
        return {}
    out: dict[str, float] = {}
    ae = models.autoencoder.eval()
    if config.phase == "1":
        a_hu = np.stack([norm.to_hu(val.source[i]) for i in indices])
        b_hu = np.stack([norm.to_hu(val.target[i]) for i in indices])
        body = b_hu > -500.0
        with torch.no_grad():
            for name, ref in (("a", a_hu), ("b", b_hu)):
                x = torch.from_numpy(norm.to_model(ref))[:, None].to(device)
                rec = norm.to_hu(ae.decode(ae.encode(x)).float().cpu().numpy()[:, 0])
                out[f"roundtrip_rmse_hu_{name}"] = float(np.sqrt(np.mean((rec - ref) ** 2)))
                out[f"roundtrip_hp_sd_ratio_{name}"] = _highpass_sd(rec, body) / _highpass_sd(
                    ref, body
                )
        ae.train()
        return out
    mode = EngineMode.UNETPP_REGRESSION if config.phase == "regression" else EngineMode.LTDIFF
    weights = _weights_for_export(config, models, val, mode, with_envelope=False)
    engine = LTDiffEngine(weights, weights_sha256="validation", device=str(device), batch_slices=2)
    # Per held-out subject (each is one series with its own spacing and noise, which a
    # conditioned engine measures): `val_slices` slices each, then the mean over subjects.
    per: dict[str, list[float]] = {"rmse_hu": [], "hp_sd_ratio": [], "input_rmse_hu": []}
    for subject in sorted(set(val.subjects)):
        members = val.indices_of(subject)
        picks = [members[i] for i in spread_indices(len(members), config.val_slices)]
        a_hu = np.stack([norm.to_hu(val.source[i]) for i in picks])
        b_hu = np.stack([norm.to_hu(val.target[i]) for i in picks])
        body = b_hu > -500.0
        # The series condition comes from the whole source series, as at inference.
        geometry = SeriesGeometry(val.pixel_spacing_mm[members[0]], tuple(map(float, picks)))
        noise = val.noise_hu[members[0]] if val.noise_hu else None
        pred = engine.standardize(a_hu, geometry, seed=config.seed, noise_hu=noise)
        ratio = _highpass_sd(pred, body) / _highpass_sd(b_hu, body)
        per["rmse_hu"].append(float(np.sqrt(np.mean((pred - b_hu) ** 2))))
        per["hp_sd_ratio"].append(ratio)
        per["input_rmse_hu"].append(float(np.sqrt(np.mean((a_hu - b_hu) ** 2))))
        out[f"hp_sd_ratio_{subject}"] = ratio
    out.update({k: float(np.mean(v)) for k, v in per.items()})
    ae.train()
    return out


def _write_jsonl(path: Path, record: dict[str, object]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


@dataclass
class TrainResult:
    """What `train` returns (tests and the DDP check use the unwrapped models)."""

    models: Models
    step: int
    last_metrics: dict[str, float]
    export_sha256: str | None = None


def train(config: TrainConfig) -> TrainResult:
    """Run one phase (module docstring)."""
    ctx = setup_distributed(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    out_dir = Path(config.out_dir)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    norm = HUNormalization()
    train_data = load_paired_slices(
        config.data,
        holdout=config.holdout,
        split="train",
        normalization=norm,
        source_kernel=config.source_kernel,
        target_kernel=config.target_kernel,
        max_slices=config.max_train_slices,
    )
    val_data = load_paired_slices(
        config.data,
        holdout=config.holdout,
        split="holdout",
        normalization=norm,
        source_kernel=config.source_kernel,
        target_kernel=config.target_kernel,
    )
    models = _build_models(config, train_data, ctx.device)
    schedule = NoiseSchedule.from_config(models.schedule_config) if models.schedule_config else None
    objective = Objective(
        config.phase,
        config=config,
        autoencoder=models.autoencoder,
        denoiser=models.denoiser,
        schedule=schedule,
        latent_scale=models.latent_scale,
        target_scale=models.target_scale,
        teacher=models.teacher,
    ).to(ctx.device)
    if ctx.device.type == "cuda":
        objective = cast(Any, objective).to(memory_format=torch.channels_last)
    params = [p for p in objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.99)
    )

    start_step = 0
    elapsed_before = 0.0
    ckpt_path = out_dir / CKPT_NAME
    if config.resume and ckpt_path.is_file():
        ckpt = _load_checkpoint(ckpt_path)
        if ckpt["phase"] != config.phase:
            raise ValueError(f"{ckpt_path} is a phase-{ckpt['phase']} run, not {config.phase}")
        models.autoencoder.load_state_dict(ckpt["autoencoder"], strict=True)
        if models.denoiser is not None:
            models.denoiser.load_state_dict(ckpt["denoiser"], strict=True)
        models.latent_scale = float(ckpt["latent_scale"])
        # Checkpoints of phase 1 / regression runs before s_r existed lack it; unused there.
        models.target_scale = float(ckpt.get("target_scale", 1.0))
        objective.latent_scale = models.latent_scale
        objective.target_scale = models.target_scale
        optimizer.load_state_dict(ckpt["optimizer"])
        start_step = int(ckpt["step"])
        elapsed_before = float(ckpt["elapsed_s"])
    if start_step > 0 and ctx.world_size == 1:
        torch.set_rng_state(ckpt["rng_cpu"])  # an exact continuation of the interrupted run
    else:
        # Different t / noise draws per rank (model init above was identical on every rank; DDP
        # also broadcasts rank 0's parameters). Only rank 0's RNG state is checkpointed, so a
        # resumed multi-process run reseeds from the step instead.
        torch.manual_seed(config.seed + 1000 * (ctx.rank + 1) + start_step)
    wrapped: nn.Module = objective
    if ctx.world_size > 1:
        wrapped = DistributedDataParallel(
            objective, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
        )
    use_amp = config.amp != "off" and (
        ctx.device.type == "cuda"
        or (config.cpu_amp and denoiser_autocast_dtype(ctx.device, "auto") is torch.bfloat16)
    )
    amp_dtype = torch.float16 if config.amp == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and config.amp == "fp16")

    dataset = PatchPairs(
        train_data,
        patch=config.patch,
        length=config.batch_size * ctx.world_size * 100,
        mode="images" if config.phase == "1" else "pairs",
        seed=config.seed,
    )
    sampler: DistributedSampler[Any] = DistributedSampler(
        dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=config.seed
    )
    batches = _batches(dataset, sampler, config.batch_size, start_step)
    metrics_path = out_dir / METRICS_NAME

    def checkpoint(step: int, elapsed: float) -> None:
        if not ctx.is_main:
            return
        den = models.denoiser
        _save_checkpoint(
            ckpt_path,
            {
                "format": CKPT_FORMAT,
                "phase": config.phase,
                "step": step,
                "elapsed_s": elapsed,
                "config": config.to_json(),
                "autoencoder_config": models.autoencoder.config.to_json(),
                "autoencoder": unwrap_state(models.autoencoder),
                "denoiser_config": den.config.to_json() if den is not None else "null",
                "denoiser": unwrap_state(den) if den is not None else {},
                "schedule_config": (
                    models.schedule_config.to_json() if models.schedule_config else "null"
                ),
                "latent_scale": models.latent_scale,
                "target_scale": models.target_scale,
                "optimizer": optimizer.state_dict(),
                "rng_cpu": torch.get_rng_state(),
                "history": json.dumps([*models.history, _phase_record(config, step, elapsed, ctx)]),
                "data_summary": json.dumps(train_data.summary()),
            },
        )

    t0 = time.monotonic()
    last: dict[str, float] = {}
    bar = tqdm(
        total=config.steps,
        initial=start_step,
        disable=not (ctx.is_main and config.progress),
        desc=f"phase {config.phase}",
        dynamic_ncols=True,
    )
    objective.train()
    step = start_step
    for step in range(start_step, config.steps):
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        a, b, series = next(batches)
        a, b, series = a.to(ctx.device), b.to(ctx.device), series.to(ctx.device)
        autocast = (
            torch.autocast(device_type=ctx.device.type, dtype=amp_dtype)
            if use_amp
            else nullcontext()
        )
        with autocast:
            loss, parts = wrapped(a, b, series)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if config.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        done = step + 1
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss is {loss_value} at step {done}")
        if ctx.is_main and (done % config.log_interval == 0 or done == config.steps):
            last = {"loss": loss_value, **{k: float(v) for k, v in parts.items()}}
            elapsed = elapsed_before + time.monotonic() - t0
            record = {"phase": config.phase, "step": done, "lr": lr, "time_s": elapsed, **last}
            _write_jsonl(metrics_path, {"split": "train", **record})
            bar.set_postfix(loss=f"{loss_value:.4g}")
        if (
            ctx.is_main
            and config.eval_interval > 0
            and (done % config.eval_interval == 0 or done == config.steps)
        ):
            val = validate(config, models, val_data, ctx.device)
            if val:
                _write_jsonl(
                    metrics_path,
                    {"split": "val", "phase": config.phase, "step": done, **val},
                )
                last.update({f"val_{k}": v for k, v in val.items()})
                bar.write(f"step {done} val " + " ".join(f"{k}={v:.4g}" for k, v in val.items()))
        if done % config.ckpt_interval == 0 or done == config.steps:
            checkpoint(done, elapsed_before + time.monotonic() - t0)
        bar.update(1)
    bar.close()
    final_step = max(step + 1, start_step) if config.steps > start_step else start_step
    elapsed = elapsed_before + time.monotonic() - t0
    if config.steps <= start_step:
        checkpoint(final_step, elapsed)
    models.history = [*models.history, _phase_record(config, final_step, elapsed, ctx)]

    export_sha = None
    if config.export is not None and ctx.is_main:
        export_sha = export(config, models, train_data)
    if ctx.world_size > 1:
        dist.barrier()
    return TrainResult(models, final_step, last, export_sha)


def _phase_record(
    config: TrainConfig, step: int, elapsed: float, ctx: DistContext
) -> dict[str, object]:
    device = str(ctx.device)
    if ctx.device.type == "cuda":
        device += f" ({torch.cuda.get_device_name(ctx.device)})"
    return {
        "phase": config.phase,
        "steps": step,
        "seconds": round(elapsed, 1),
        "device": device,
        "world_size": ctx.world_size,
        "threads": torch.get_num_threads(),
        "batch_size": config.batch_size,
        "patch": config.patch,
        "lr": config.lr,
        "lambda_latent": config.lambda_latent,
        "lambda_image": config.lambda_image,
        "command": config.command,
    }


def export(config: TrainConfig, models: Models, train_data: PairedSlices) -> str:
    """Write the self-describing weights file (kind by phase); refuse one over the 30 MB limit."""
    if config.export is None:
        raise ValueError("no --export path")
    if config.phase == "1":
        raise ValueError("phase 1 trains the autoencoder only: export after phase 2 or 3")
    mode = EngineMode.UNETPP_REGRESSION if config.phase == "regression" else EngineMode.LTDIFF
    weights = _weights_for_export(config, models, train_data, mode)
    path = Path(config.export)
    path.parent.mkdir(parents=True, exist_ok=True)
    sha = save_weights(path, weights)
    size = path.stat().st_size
    if size > MAX_SHIPPED_BYTES:
        path.unlink()
        raise ValueError(f"weights file would be {size / 2**20:.1f} MB, over the 30 MB limit")
    print(f"exported {mode.value} weights to {path} ({size / 2**20:.2f} MB, sha256 {sha[:12]})")
    return sha


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig(phase="1", data=(), out_dir=Path())
    p = argparse.ArgumentParser(
        prog="ltdiff-node train ltdiff",
        description="Train LTDiff++ (phases 1, 2, 3) or the UNet++ regression ablation.",
    )
    p.add_argument("--phase", required=True, choices=["1", "2", "3", "regression", "distill"])
    p.add_argument("--data", type=Path, action="append", required=True, help="repeatable")
    p.add_argument("--out", type=Path, required=True, help="run folder (ckpt.pt, metrics.jsonl)")
    p.add_argument(
        "--init",
        type=Path,
        help="previous phase's ckpt.pt (phases 2 and 3), or an exported LTDiff++ .safetensors "
        "file to warm-start from (its autoencoder, scales and denoiser)",
    )
    p.add_argument("--export", type=Path, help="write the weights file at the end")
    p.add_argument("--holdout", default=",".join(d.holdout), help="subjects kept out, comma list")
    p.add_argument("--source-kernel", default=d.source_kernel, help="regex")
    p.add_argument("--target-kernel", default=d.target_kernel, help="regex")
    for name in ("steps", "batch_size", "patch", "warmup_steps", "seed", "log_interval"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    for name in ("eval_interval", "ckpt_interval", "val_slices", "latent_channels"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    p.add_argument("--max-train-slices", type=int)
    for name in ("lr", "min_lr_ratio", "weight_decay", "grad_clip", "lambda_latent"):
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(d, name))
    for name in ("lambda_image", "lambda_recon", "sample_eta"):
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(d, name))
    p.add_argument("--recon-loss", choices=["l1", "l2", "l1+l2"], default=d.recon_loss)
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N")
    p.add_argument(
        "--amp",
        choices=["bf16", "fp16", "off"],
        default=d.amp,
        help="autocast on CUDA (and on a CPU with native bf16 when --cpu-amp is given)",
    )
    p.add_argument(
        "--cpu-amp",
        action="store_true",
        help="bf16 autocast on a CPU that computes bf16 natively (AVX512-BF16, AMX)",
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (e.g. 1 on a shared machine)")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing OUT/ckpt.pt")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--encoder-channels", type=_ints, default=d.encoder_channels)
    p.add_argument("--decoder-channels", type=_ints, default=d.decoder_channels)
    p.add_argument("--denoiser-channels", type=_ints, default=d.denoiser_channels)
    p.add_argument(
        "--denoiser-patch",
        type=int,
        choices=[1, 2],
        default=d.denoiser_patch,
        help="denoiser space-to-depth factor on the latent: 2 runs the UNet at a quarter of the "
        "latent's pixels (cheap, coarse grain), 1 at the latent's resolution (finest grain)",
    )
    p.add_argument("--schedule", choices=["linear", "scaled_linear", "cosine"], default=d.schedule)
    p.add_argument("--prediction", choices=["epsilon", "sample", "v"], default=d.prediction)
    p.add_argument("--diffusion-target", choices=["residual", "latent"], default=d.diffusion_target)
    p.add_argument(
        "--condition",
        choices=["none", "spacing-noise"],
        default=d.condition,
        help="what the denoiser knows of the series (pixel spacing, measured noise level)",
    )
    p.add_argument("--sample-steps", type=int, default=d.sample_steps, help="DDIM steps, <= 10")
    p.add_argument(
        "--teacher-steps",
        type=int,
        help="phase distill: the teacher's DDIM steps (default: its weights file's setting)",
    )
    p.add_argument(
        "--student-steps",
        type=int,
        default=d.student_steps,
        help="phase distill: the student's steps (1: one network evaluation per slice)",
    )
    return p


_ARG_FIELDS = (
    "steps",
    "batch_size",
    "patch",
    "warmup_steps",
    "seed",
    "log_interval",
    "eval_interval",
    "ckpt_interval",
    "val_slices",
    "latent_channels",
    "max_train_slices",
    "lr",
    "min_lr_ratio",
    "weight_decay",
    "grad_clip",
    "lambda_latent",
    "lambda_image",
    "lambda_recon",
    "sample_eta",
    "recon_loss",
    "device",
    "amp",
    "threads",
    "encoder_channels",
    "decoder_channels",
    "denoiser_channels",
    "denoiser_patch",
    "schedule",
    "prediction",
    "diffusion_target",
    "condition",
    "sample_steps",
    "teacher_steps",
    "student_steps",
    "cpu_amp",
    "init",
    "export",
    "source_kernel",
    "target_kernel",
)
"""TrainConfig fields set directly from the command-line option of the same name."""


def config_from_args(argv: Sequence[str]) -> TrainConfig:
    a = build_parser().parse_args(list(argv))
    base = TrainConfig(phase=a.phase, data=tuple(a.data), out_dir=a.out)
    values = {k: getattr(a, k) for k in _ARG_FIELDS}
    return replace(
        base,
        holdout=tuple(s.strip() for s in a.holdout.split(",") if s.strip()),
        resume=not a.no_resume,
        progress=not a.no_progress,
        command="ltdiff-node train ltdiff " + " ".join(argv),
        **values,
    )


def main(argv: Sequence[str] | None = None) -> int:
    config = config_from_args(sys.argv[1:] if argv is None else argv)
    try:
        result = train(config)
    except (ValueError, FileNotFoundError) as exc:
        print(f"train ltdiff: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if result.last_metrics:
        print(" ".join(f"{k}={v:.5g}" for k, v in sorted(result.last_metrics.items())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
