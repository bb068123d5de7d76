"""`ltdiff-node demo`, the README's first command: the whole path on loopback, in-process."""

from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from dicom_node import demo
from dicom_node.config import NodeConfig
from engine.interface import EngineError
from engine.ltdiff.engine import LTDiffEngine
from engine.ltdiff.weights import shipped_weights_path


def test_demo_sends_a_phantom_through_the_node_and_gets_the_derived_series_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    code = demo.main(
        ["--out", str(out), "--slices", "4", "--stable-age", "0.5", "--engine", "linear-filter"]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "engine 'linear-filter'" in printed
    assert "arrived in the archive: 4 images" in printed
    assert (out / "demo-side-by-side.png").stat().st_size > 10_000
    derived = [dcmread(p) for p in (out / "archive").rglob("*.dcm")]
    assert len(derived) == 4
    assert all("DERIVED" in ds.ImageType for ds in derived)


def test_auto_engine_is_ltdiff_only_when_its_weights_are_installed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import engine.ltdiff.weights as weights

    def missing(pair: str = "br40d-bl64d") -> Path:
        raise EngineError("not installed")

    monkeypatch.setattr(weights, "shipped_weights_path", missing)
    assert demo.demo_engine_kind("auto") == "linear-filter"
    monkeypatch.setattr(weights, "shipped_weights_path", lambda pair="": tmp_path / "w")
    assert demo.demo_engine_kind("auto") == "ltdiff"
    assert demo.demo_engine_kind("linear-filter") == "linear-filter"


def test_demo_runs_the_shipped_ltdiff_engine_by_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "demo"
    code = demo.main(["--out", str(out), "--slices", "2", "--stable-age", "0.5"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "engine 'ltdiff'" in printed
    derived = [dcmread(p) for p in (out / "archive").rglob("*.dcm")]
    assert len(derived) == 2
    assert all("ltdiff++" in ds.DerivationDescription for ds in derived)
    shipped = LTDiffEngine.from_file(shipped_weights_path()).identity.settings
    assert all(f"settings {shipped}" in ds.DerivationDescription for ds in derived)


def test_demo_device_option_reaches_the_node_engine_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--device cuda:1` becomes the engine's and the worker's device; with no GPU here, the
    recorded config is then swapped for a CPU one so the demo still runs end to end."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    asked: list[tuple[tuple[str, ...], tuple[str, ...]]] = []
    real = demo.loopback_config

    def recording(*args: Any, device: str, **kwargs: Any) -> NodeConfig:
        config = real(*args, device=device, **kwargs)
        asked.append((config.workers, tuple(e.device for e in config.engines)))
        return real(*args, device="cpu", **kwargs)

    monkeypatch.setattr(demo, "loopback_config", recording)
    argv = ["--out", str(tmp_path / "demo"), "--slices", "2", "--stable-age", "0.5"]
    code = demo.main([*argv, "--engine", "ltdiff", "--device", "cuda:1"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert asked == [(("cuda:1",), ("cuda:1",))]
    assert "engine 'ltdiff' on 'cuda:1'" in printed
    assert "the engine worker on 'cpu': decode" in printed, "the job's own record of its device"
