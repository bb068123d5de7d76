"""`ltdiff-node demo --device`: which device the demo's engine worker gets, checked before any
server starts (no GPU needed: torch's CUDA queries are replaced)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from dicom_node import demo
from engine.interface import EngineError


def _gpus(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


def test_auto_is_cuda_for_a_learned_engine_only_when_a_gpu_is_seen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _gpus(monkeypatch, 0)
    assert demo.demo_device("auto", "ltdiff") == "cpu"
    _gpus(monkeypatch, 1)
    assert demo.demo_device("auto", "ltdiff") == "cuda"
    assert demo.demo_device("auto", "linear-filter") == "cpu", "the filter runs on the CPU"
    assert demo.demo_device("cpu", "ltdiff") == "cpu"


def test_an_explicit_cuda_device_must_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    _gpus(monkeypatch, 2)
    assert demo.demo_device("cuda:1", "ltdiff") == "cuda:1"
    with pytest.raises(EngineError, match=r"'cuda:2' asked for, but PyTorch sees 2 CUDA"):
        demo.demo_device("cuda:2", "ltdiff")
    _gpus(monkeypatch, 0)
    with pytest.raises(EngineError, match="sees no CUDA device"):
        demo.demo_device("cuda", "linear-filter")


def test_device_spelling_is_checked_by_the_parser() -> None:
    assert demo.device_choice("cuda:3") == "cuda:3"
    with pytest.raises(argparse.ArgumentTypeError, match="'gpu0' is not auto, cpu, cuda or"):
        demo.device_choice("gpu0")


def test_demo_without_the_asked_gpu_fails_before_starting_anything(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _gpus(monkeypatch, 0)
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--engine", "linear-filter", "--device", "cuda"]) == 1
    assert "sees no CUDA device" in capsys.readouterr().err
    assert not out.exists(), "no phantom written, no node started"
