"""Tiny LTDiff++ models and a tiny paired-kernel DICOM dataset for the LTDiff++ tests.

Everything is deterministic (fixed seeds) and small enough that a forward pass takes milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pydicom import dcmwrite

from engine.envelope import ValidatedEnvelope
from engine.ltdiff.latent_diffusion import DenoiserConfig, LatentDenoiser, ScheduleConfig
from engine.ltdiff.unetpp import UNetPlusPlusAutoencoder, UNetPPConfig
from engine.ltdiff.weights import EngineMode, LTDiffWeights, SamplingConfig
from engine.synthetic import make_ct_dataset, phantom_slice, synthetic_uid

TINY_AE = UNetPPConfig(
    latent_channels=4, patch=2, encoder_channels=(4, 8), decoder_channels=(4, 8, 8), groups=2
)
TINY_DENOISER = DenoiserConfig(
    latent_channels=4, patch=2, channels=(8, 16), time_embed_dim=16, groups=4
)
TINY_TRAIN_ARGS = [
    "--latent-channels",
    "4",
    "--encoder-channels",
    "4,8",
    "--decoder-channels",
    "4,8,8",
    "--denoiser-channels",
    "8,16",
    "--batch-size",
    "2",
    "--patch",
    "16",
    "--threads",
    "1",
    "--no-progress",
    "--log-interval",
    "1",
    "--val-slices",
    "1",
]


def tiny_weights(
    mode: EngineMode = EngineMode.LTDIFF,
    *,
    seed: int = 0,
    num_steps: int = 3,
    eta: float = 0.5,
    envelope: ValidatedEnvelope | None = None,
) -> LTDiffWeights:
    """Randomly initialized tiny weights (the denoiser head is perturbed so the output depends on
    the network, not only on the zero-initialized head), with `envelope` as their validated
    envelope (none by default)."""
    torch.manual_seed(seed)
    ae = UNetPlusPlusAutoencoder(TINY_AE)
    den = LatentDenoiser(TINY_DENOISER)
    with torch.no_grad():
        den.head.weight.normal_(0.0, 0.05)
    ltdiff = mode is EngineMode.LTDIFF
    return LTDiffWeights(
        mode=mode,
        autoencoder_config=TINY_AE,
        autoencoder_state=ae.state_dict(),
        source_kernel="Br40d",
        target_kernel="Bl64d",
        denoiser_config=TINY_DENOISER if ltdiff else None,
        denoiser_state=den.state_dict() if ltdiff else None,
        schedule_config=ScheduleConfig(kind="cosine", num_train_timesteps=100) if ltdiff else None,
        sampling=SamplingConfig(num_steps=num_steps, eta=eta),
        latent_scale=1.5,
        target_scale=3.0,
        training={"note": "tiny test weights"},
        envelope=envelope,
    )


def smooth(image: np.ndarray, passes: int = 2) -> np.ndarray:
    out = image.astype(np.float64)
    for _ in range(passes):
        out = (out + np.roll(out, 1, 0) + np.roll(out, -1, 0) + np.roll(out, 1, 1)) / 4.0
    return out


def write_kernel_pairs(
    root: Path,
    subjects: tuple[str, ...] = ("S001", "S002", "S004"),
    n_slices: int = 2,
    size: int = 32,
) -> Path:
    """root/<subject>/*.dcm: a Br40d-like and a Bl64d-like series of one study per subject, paired
    by tags (same study, frame of reference and positions), with shared noise filtered twice."""
    rng = np.random.default_rng(0)
    for subject in subjects:
        folder = root / subject
        folder.mkdir(parents=True, exist_ok=True)
        uid_seed = f"ltdiff-test-{subject}"
        for k in range(n_slices):
            base = phantom_slice(size, size, z_fraction=k / max(n_slices - 1, 1))
            noise = rng.normal(0.0, 60.0, (size, size))
            sharp = base + noise
            soft = smooth(sharp)
            for kernel, image, number in (("Br40d", soft, 2), ("Bl64d", sharp, 3)):
                ds = make_ct_dataset(
                    image.astype(np.float32),
                    position=(0.0, 0.0, float(k)),
                    instance_number=k + 1,
                    kernel=kernel,
                    uid_seed=uid_seed,
                    series_uid=synthetic_uid(uid_seed, "series", kernel),
                    series_number=number,
                )
                dcmwrite(folder / f"{ds.SOPInstanceUID}.dcm", ds, enforce_file_format=True)
    return root


def ddp_worker(rank: int, world_size: int, port: int, data: str, out: str, result_dir: str) -> None:
    """One rank of a CPU/gloo DDP run of phase 1 (tests/component/test_ddp.py), started the way
    torchrun starts ranks: through the environment. Saves its flattened parameters."""
    import os

    from training.train_ltdiff import config_from_args, train

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    args = [
        "--phase", "1", "--data", data, "--out", out, "--steps", "2", "--holdout", "S004",
        "--eval-interval", "0", "--device", "cpu", "--no-resume", *TINY_TRAIN_ARGS,
    ]  # fmt: skip
    result = train(config_from_args(args))
    flat = torch.cat([p.detach().flatten() for p in result.models.autoencoder.parameters()])
    torch.save(flat, Path(result_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()
