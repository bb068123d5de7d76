"""The `cluster` extra (`standardize --scheduler/--local-cluster`) without starting a cluster:
packaging, the message when the extra is missing, the command line's limits, and the engines
a worker keeps between its series. tests/component/test_cluster_standardize.py runs a cluster."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
from tests_support import require_cluster_extra

from dicom_node import cluster
from dicom_node.cli import EXIT_UNAVAILABLE, EXIT_USAGE, main
from dicom_node.config import parse_config
from dicom_node.offline import JobOutcome, JobStatus, PlannedJob, SeriesFiles
from engine.envelope_policy import OutsideEnvelope

REPO = Path(__file__).resolve().parents[2]


def test_the_cluster_extra_holds_distributed_and_the_base_install_does_not():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert any(r.startswith("distributed>=") for r in project["optional-dependencies"]["cluster"])
    assert not [r for r in project["dependencies"] if r.startswith(("dask", "distributed"))]


def _make_dry_run(tmp_path: Path, *args: str) -> str:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    done = subprocess.run(
        [make, "-n", "-C", str(REPO), *args, f"VENV={tmp_path / 'venv'}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


def test_make_test_installs_the_cluster_extra_and_make_install_only_when_asked(tmp_path):
    assert 'pip install -q ".[cluster]"' in _make_dry_run(tmp_path, "test")
    assert "[cluster]" not in _make_dry_run(tmp_path, "install")
    assert 'pip install -q ".[cluster]"' in _make_dry_run(tmp_path, "install", "EXTRAS=cluster")


@pytest.mark.parametrize("option", [["--local-cluster", "2"], ["--scheduler", "tcp://h:8786"]])
def test_without_the_extra_the_command_names_it_and_exits_69(tmp_path, capsys, monkeypatch, option):
    monkeypatch.setitem(sys.modules, "distributed", None)
    assert main(["standardize", str(tmp_path), str(tmp_path / "out"), *option]) == EXIT_UNAVAILABLE
    err = capsys.readouterr().err
    assert "Missing: distributed." in err
    assert f"{sys.executable} -m pip install 'ltdiff-node[cluster]'" in err
    assert "make install EXTRAS=cluster" in err
    assert not (tmp_path / "out").exists()


def test_a_cluster_run_takes_one_device(tmp_path, capsys):
    argv = ["standardize", str(tmp_path), str(tmp_path / "out"), "--local-cluster", "2"]
    assert main([*argv, "--device", "cuda:0,cuda:1"]) == EXIT_USAGE
    assert "--device: one device with --scheduler or --local-cluster" in capsys.readouterr().err


@pytest.mark.parametrize(
    "where",
    [["-j", "2", "--local-cluster", "2"], ["--scheduler", "tcp://h:1", "--local-cluster", "2"]],
)
def test_jobs_scheduler_and_local_cluster_exclude_each_other(tmp_path, capsys, where):
    with pytest.raises(SystemExit) as stopped:
        main(["standardize", str(tmp_path), str(tmp_path / "out"), *where])
    assert stopped.value.code == EXIT_USAGE
    assert "not allowed with argument" in capsys.readouterr().err


def test_a_series_on_a_gpu_asks_for_one_gpu_resource():
    assert cluster.task_resources("cuda") == {"GPU": 1.0}
    assert cluster.task_resources("cuda:1") == {"GPU": 1.0}
    assert cluster.task_resources("cpu") is None


def test_a_worker_thread_loads_its_engines_once_and_again_for_another_device():
    config = parse_config({})
    first = cluster.worker_engines(config, "cpu")
    assert cluster.worker_engines(parse_config({}), "cpu") is first, "an equal config reuses them"
    assert cluster.worker_engines(config, None) is not first
    other: list[object] = []
    thread = threading.Thread(target=lambda: other.append(cluster.worker_engines(config, None)))
    thread.start()
    thread.join()
    assert other[0] is not cluster.worker_engines(config, None), "one set per worker thread"


def _cluster_runner():
    require_cluster_extra()
    from dicom_node import cluster_runner

    return cluster_runner


class _Raises:
    """A finished Dask future whose task raised `error`."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def result(self) -> object:
        raise self.error


def _job() -> PlannedJob:
    config = parse_config({})
    series = SeriesFiles("1.2.826.0.1.3680043.2.1125.1", (Path("/in/1.dcm"),), {}, False)
    return PlannedJob(
        1, series, None, config.engines[0], OutsideEnvelope.FALLBACK, config.engines[0]
    )


def test_a_series_whose_workers_died_or_whose_task_raised_is_a_failed_outcome():
    runner = _cluster_runner()
    from distributed import KilledWorker

    worker = SimpleNamespace(address="tcp://10.0.0.7:40000")
    died = runner._outcome(_job(), _Raises(KilledWorker("run_series-1", worker, 3)))
    assert isinstance(died, JobOutcome) and died.status is JobStatus.FAILED
    assert died.error == runner.WORKER_KILLED and not died.engine_unavailable
    raised = runner._outcome(_job(), _Raises(ModuleNotFoundError("No module named 'dicom_node'")))
    assert isinstance(raised, JobOutcome) and raised.status is JobStatus.FAILED
    assert raised.error.startswith("the task failed on its worker: ModuleNotFoundError"), raised
