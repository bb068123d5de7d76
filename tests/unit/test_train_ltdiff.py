"""Training LTDiff++: a 2-step smoke run per phase on tiny DICOM pairs, checkpoints that resume
exactly, export to a working engine, and the CLI entry point."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ltdiff_support import TINY_TRAIN_ARGS, write_kernel_pairs

from dicom_node.cli import main as cli_main
from engine.interface import EngineError, SeriesGeometry
from engine.ltdiff.engine import LTDiffEngine
from engine.ltdiff.latent_diffusion import NoiseSchedule
from engine.ltdiff.sampler import DDIMSampler
from training.train_ltdiff import (
    CKPT_NAME,
    METRICS_NAME,
    Objective,
    TrainConfig,
    _models_for_distillation,
    config_from_args,
    lr_at,
    main,
    train,
)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_kernel_pairs(tmp_path_factory.mktemp("pairs"))


def _args(data: Path, out: Path, phase: str, steps: int = 2, *extra: str) -> list[str]:
    return [
        "--phase", phase, "--data", str(data), "--out", str(out), "--steps", str(steps),
        "--holdout", "S004", "--eval-interval", str(steps), "--ckpt-interval", "1",
        *TINY_TRAIN_ARGS, *extra,
    ]  # fmt: skip


def _records(out: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (out / METRICS_NAME).read_text().splitlines()]


def _ckpt(out: Path) -> dict[str, object]:
    return torch.load(out / CKPT_NAME, map_location="cpu", weights_only=True)  # type: ignore[no-any-return]


def test_phase1_trains_writes_metrics_and_a_resumable_checkpoint(
    pairs: Path, tmp_path: Path
) -> None:
    out = tmp_path / "p1"
    assert main(_args(pairs, out, "1")) == 0
    ckpt = _ckpt(out)
    assert ckpt["phase"] == "1" and ckpt["step"] == 2
    records = _records(out)
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2]
    val = [r for r in records if r["split"] == "val"]
    assert val and "roundtrip_rmse_hu_b" in val[0], "phase 1 validates the round trip on S004"
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["autoencoder"])  # type: ignore[union-attr]

    assert main(_args(pairs, out, "1", 3)) == 0  # resumes at step 2, runs one more
    assert _ckpt(out)["step"] == 3
    assert [r["step"] for r in _records(out) if r["split"] == "train"] == [1, 2, 3]


def test_resume_continues_exactly_where_the_run_stopped(pairs: Path, tmp_path: Path) -> None:
    straight = train(config_from_args(_args(pairs, tmp_path / "a", "1", 4)))
    train(config_from_args(_args(pairs, tmp_path / "b", "1", 2)))
    resumed = train(config_from_args(_args(pairs, tmp_path / "b", "1", 4)))
    for (name, p), q in zip(
        straight.models.autoencoder.state_dict().items(),
        resumed.models.autoencoder.state_dict().values(),
        strict=True,
    ):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=f"{name} differs after resume")


def test_phases_2_and_3_export_weights_the_engine_runs(pairs: Path, tmp_path: Path) -> None:
    assert main(_args(pairs, tmp_path / "p1", "1")) == 0
    p2 = tmp_path / "p2"
    assert main(_args(pairs, p2, "2", 2, "--init", str(tmp_path / "p1" / CKPT_NAME))) == 0
    ckpt2 = _ckpt(p2)
    assert ckpt2["phase"] == "2" and float(ckpt2["latent_scale"]) > 0  # type: ignore[arg-type]
    parts = [r for r in _records(p2) if r["split"] == "train"][-1]
    assert {"denoise", "latent", "image"} <= set(parts), "phase 2 logs the combined objective"
    assert any(r["split"] == "val" and "hp_sd_ratio" in r for r in _records(p2))

    weights = tmp_path / "ltdiff.safetensors"
    p3 = tmp_path / "p3"
    args3 = _args(pairs, p3, "3", 2, "--init", str(p2 / CKPT_NAME), "--export", str(weights))
    assert main([*args3, "--sample-steps", "2"]) == 0
    assert "recon" in [r for r in _records(p3) if r["split"] == "train"][-1]
    engine = LTDiffEngine.from_file(weights, expected_kind="ltdiff")
    history = engine.weights.training["history"]
    assert [h["phase"] for h in history] == ["1", "2", "3"]  # type: ignore[index]
    vol = np.full((2, 32, 32), 40.0, np.float32)
    out = engine.standardize(vol, SeriesGeometry((0.7, 0.7), (0.0, 1.0)), seed=5)
    assert out.shape == vol.shape and out.dtype == np.float32


def test_regression_ablation_exports_its_own_kind(pairs: Path, tmp_path: Path) -> None:
    weights = tmp_path / "reg.safetensors"
    args = _args(pairs, tmp_path / "reg", "regression", 2, "--export", str(weights))
    assert main(args) == 0
    assert _ckpt(tmp_path / "reg")["phase"] == "regression"
    engine = LTDiffEngine.from_file(weights, expected_kind="unetpp-regression")
    assert engine.identity.name == "unetpp-regression"


def test_phase_2_without_init_fails_with_a_message(
    pairs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(_args(pairs, tmp_path / "p2", "2")) == 2
    assert "needs --init" in capsys.readouterr().err


def test_cli_forwards_train_ltdiff(pairs: Path, tmp_path: Path) -> None:
    assert cli_main(["train", "ltdiff", *_args(pairs, tmp_path / "cli", "1", 1)]) == 0
    assert (tmp_path / "cli" / CKPT_NAME).is_file()


def test_learning_rate_warms_up_then_decays_to_the_floor() -> None:
    cfg = TrainConfig(phase="1", data=(), out_dir=Path(), steps=100, warmup_steps=10, lr=1e-3)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(100, cfg) == pytest.approx(1e-4)
    assert lr_at(55, cfg) == pytest.approx(0.55e-3)


@pytest.fixture(scope="module")
def teacher(pairs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny exported LTDiff++ (phases 1 and 2, 2 DDIM steps) to distill from."""
    root = tmp_path_factory.mktemp("teacher")
    assert main(_args(pairs, root / "p1", "1")) == 0
    weights = root / "teacher.safetensors"
    args = _args(pairs, root / "p2", "2", 2, "--init", str(root / "p1" / CKPT_NAME))
    assert main([*args, "--export", str(weights), "--sample-steps", "2"]) == 0
    return weights


def test_distill_exports_a_one_step_student_that_refuses_other_step_counts(
    pairs: Path, teacher: Path, tmp_path: Path
) -> None:
    student = tmp_path / "student.safetensors"
    args = _args(pairs, tmp_path / "d", "distill", 2, "--init", str(teacher))
    assert main([*args, "--export", str(student)]) == 0
    assert "latent" in [r for r in _records(tmp_path / "d") if r["split"] == "train"][-1]
    engine = LTDiffEngine.from_file(student, expected_kind="ltdiff")
    sampling = engine.weights.sampling
    assert sampling.distilled and sampling.num_steps == 1 and sampling.eta == 0.0
    assert engine.identity.settings == "distilled1"
    history = engine.weights.training["history"]
    teacher_sha = LTDiffEngine.from_file(teacher).identity.weights_sha256
    assert {"phase": "teacher", "sha256": teacher_sha, "teacher_steps": 2}.items() <= history[
        -2
    ].items()  # type: ignore[index]
    vol = np.random.default_rng(0).normal(40.0, 15.0, (2, 32, 32)).astype(np.float32)
    geometry = SeriesGeometry((0.7, 0.7), (0.0, 1.0))
    one, other = (engine.standardize(vol, geometry, seed=s) for s in (5, 6))
    assert np.array_equal(one, engine.standardize(vol, geometry, seed=5)), "reproducible"
    assert not np.array_equal(one, other), "stochastic: another z_T gives another grain"
    with pytest.raises(EngineError, match="distilled to 1 sampling step"):
        LTDiffEngine.from_file(student, num_steps=4)


def test_distill_regresses_the_student_onto_the_teachers_sample_from_the_same_z_t(
    pairs: Path, teacher: Path, tmp_path: Path
) -> None:
    """The objective's plumbing: with a one-step teacher identical to the student, the student
    reproduces the teacher exactly (same z_T, same condition), so the loss is zero; a student
    that differs has a positive loss."""
    config = config_from_args(
        [*_args(pairs, tmp_path / "d", "distill", 1, "--init", str(teacher)), "--no-resume"]
    )
    models = _models_for_distillation(config)
    assert models.teacher is not None and models.denoiser is not None and models.schedule_config
    schedule = NoiseSchedule.from_config(models.schedule_config)
    one_step = DDIMSampler.create(schedule, 1, models.denoiser.config.prediction)
    objective = Objective(
        "distill",
        config=config,
        autoencoder=models.autoencoder,
        denoiser=models.denoiser,
        schedule=schedule,
        latent_scale=models.latent_scale,
        target_scale=models.target_scale,
        teacher=dataclasses.replace(models.teacher, sampler=one_step),
    )
    a = torch.randn(2, 1, 32, 32)
    series = torch.tensor([[0.7, 12.0], [0.8, 20.0]])
    torch.manual_seed(3)
    loss, _ = objective(a, a, series)
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():
        models.denoiser.head.weight.add_(0.05)  # the output layer (zero-initialized in training)
    torch.manual_seed(3)
    assert float(objective(a, a, series)[0].detach()) > 1e-6
    assert all(not p.requires_grad for p in objective.teacher_denoiser.parameters())  # type: ignore[union-attr]


def test_distill_needs_a_teacher_weights_file(pairs: Path, tmp_path: Path) -> None:
    config = config_from_args(_args(pairs, tmp_path / "d", "distill", 1))
    with pytest.raises(ValueError, match="needs --init TEACHER"):
        _models_for_distillation(config)
