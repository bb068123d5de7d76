"""Data parallelism of the LTDiff++ trainer: two CPU processes with the gloo backend, started as
torchrun would (environment variables), on a tiny model. After the training steps the parameters
must be identical on both ranks (DDP averaged the gradients) and differ from the initial ones."""

from __future__ import annotations

import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp
from ltdiff_support import TINY_AE, ddp_worker, write_kernel_pairs

from engine.ltdiff.unetpp import UNetPlusPlusAutoencoder
from training.train_ltdiff import CKPT_NAME

WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_gloo_ranks_keep_identical_parameters_after_training_steps(tmp_path: Path) -> None:
    data = write_kernel_pairs(tmp_path / "pairs")
    results = tmp_path / "results"
    results.mkdir()
    mp.spawn(
        ddp_worker,
        args=(WORLD_SIZE, _free_port(), str(data), str(tmp_path / "run"), str(results)),
        nprocs=WORLD_SIZE,
        join=True,
    )
    p0 = torch.load(results / "rank0.pt", weights_only=True)
    p1 = torch.load(results / "rank1.pt", weights_only=True)
    assert torch.equal(p0, p1), "DDP ranks diverged: gradients were not averaged"

    ckpt = torch.load(tmp_path / "run" / CKPT_NAME, weights_only=True)
    assert ckpt["step"] == 2, "rank 0 writes the checkpoint"
    assert not any(k.startswith("module.") for k in ckpt["autoencoder"]), "saved unwrapped"

    torch.manual_seed(1337)  # the trainer's default seed: the parameters before the first step
    initial = torch.cat([p.flatten() for p in UNetPlusPlusAutoencoder(TINY_AE).parameters()])
    assert initial.shape == p0.shape
    assert not torch.equal(initial, p0), "no optimizer step was taken"
