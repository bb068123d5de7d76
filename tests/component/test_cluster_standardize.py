"""`ltdiff-node standardize` on Dask distributed (the `cluster` extra, issue 11 item 4): a cluster
of two CPU worker processes writes the same derived series (Series and SOP Instance UIDs, pixel
data) as a local run, reports the same lines and exit code, and reports a series that fails on a
worker rather than losing it. Without the extra the tests skip, except under CI=true (as
`make test` and .ci/run set), where they fail: CI installs every extra.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmwrite
from tests_support import folder_contents, require_cluster_extra

from dicom_node.cli import EXIT_FAILURE, EXIT_UNAVAILABLE, main
from engine.synthetic import make_ct_series

N_SERIES = 3


@pytest.fixture(scope="module")
def scheduler() -> Iterator[str]:
    """The address of a running Dask cluster of two CPU worker processes (an 'existing' one)."""
    require_cluster_extra()
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},  # not 8787
    ) as cluster:
        yield str(cluster.scheduler_address)


def _archive(root: Path) -> None:
    """N_SERIES small Br40d series, and one whose pixel data is cut short (it must fail)."""
    series = [
        make_ct_series(3, 32, 32, "Br40d", uid_seed=f"cluster-{k}", series_number=k + 1)
        for k in range(N_SERIES)
    ]
    broken = make_ct_series(2, 32, 32, "Br40d", uid_seed="cluster-broken", series_number=9)
    for ds in broken:
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    for k, datasets in enumerate([*series, broken]):
        for i, ds in enumerate(datasets):
            path = root / f"s{k}" / f"{i}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            dcmwrite(path, ds, enforce_file_format=True)


def _lines(out: str, folder: Path) -> list[str]:
    """The printed lines without what may differ between runs: times, the output folder's name
    and the worker count."""
    text = re.sub(r" in \d+\.\d s", " in T s", out.replace(str(folder), "OUT"))
    return sorted(re.sub(r" \(\d+ workers?\)$", "", line) for line in text.splitlines())


def _run(argv: list[str], capsys: Any) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_dask_cluster_writes_what_a_local_run_writes(tmp_path, capsys, scheduler):
    _archive(tmp_path / "in")
    local, on_local_cluster, on_scheduler = (tmp_path / n for n in ("local", "lc", "sched"))
    runs = {
        local: ["standardize", str(tmp_path / "in"), str(local)],
        on_local_cluster: [
            *("standardize", str(tmp_path / "in"), str(on_local_cluster)),
            *("--local-cluster", "2"),
        ],
        on_scheduler: [
            *("standardize", str(tmp_path / "in"), str(on_scheduler)),
            *("--scheduler", scheduler),
        ],
    }
    results = {folder: _run(argv, capsys) for folder, argv in runs.items()}

    code, out, err = results[local]
    assert code == EXIT_FAILURE, f"the broken series fails the run: {out}{err}"
    failed = [line for line in out.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and failed[0].startswith('series 9 "Thorax 1.0 Br40d"'), out
    assert f"{N_SERIES} standardized, 0 skipped, 1 failed" in out
    expected = folder_contents(local)
    assert len(expected) == 3 * N_SERIES

    for folder in (on_local_cluster, on_scheduler):
        code, out, err = results[folder]
        assert code == EXIT_FAILURE, f"{runs[folder]}: {out}{err}"
        assert _lines(out, folder) == _lines(results[local][1], local), runs[folder]
        assert out.rstrip().endswith("(2 workers)"), f"both worker processes ran series: {out}"
        assert folder_contents(folder) == expected, f"{runs[folder]}: not the local run's files"


def test_a_gpu_run_on_a_cluster_without_gpu_workers_is_refused_not_left_waiting(
    tmp_path, capsys, scheduler
):
    _archive(tmp_path / "in")
    argv = ["standardize", str(tmp_path / "in"), str(tmp_path / "out")]
    code, _, err = _run([*argv, "--scheduler", scheduler, "--device", "cuda"], capsys)
    assert code == EXIT_UNAVAILABLE, err
    assert "no worker of the cluster offers the resource GPU" in err
    assert "--resources GPU=1" in err


def test_an_unreachable_scheduler_is_named(tmp_path, capsys, monkeypatch):
    require_cluster_extra()
    from dicom_node import cluster_runner

    monkeypatch.setattr(cluster_runner, "CONNECT_TIMEOUT_S", 1.0)
    _archive(tmp_path / "in")
    argv = ["standardize", str(tmp_path / "in"), str(tmp_path / "out")]
    code, _, err = _run([*argv, "--scheduler", "tcp://127.0.0.1:1"], capsys)
    assert code == EXIT_UNAVAILABLE, err
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:1" in err
