"""`ltdiff-node standardize` on a folder as a PACS exports it: several series mixed in one folder
and in nested folders, plus files that are not CT images. The node's routes decide which series
run; worker processes give the same files as one worker; Ctrl-C stops cleanly."""

import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import dcmwrite
from tests_support import folder_contents

from dicom_node import offline_runner
from dicom_node.cli import EXIT_CONFIG, main
from dicom_node.config import parse_config
from dicom_node.offline import Overrides, plan_jobs, scan_folder
from dicom_node.offline_runner import PARTIAL_PREFIX, run_plan
from engine.derived import derived_series_uid
from engine.registry import load_engine
from engine.synthetic import make_ct_series

PHI = ("LTDIFF^PHANTOM", "LTDIFF-0001")  # the synthetic patient's name and ID


def _write(paths_and_datasets: list[tuple[Path, object]]) -> None:
    for path, ds in paths_and_datasets:
        path.parent.mkdir(parents=True, exist_ok=True)
        dcmwrite(path, ds, enforce_file_format=True)


def _mixed_folder(root: Path) -> dict[str, str]:
    """Two Br40d series and one Bl64d series, their files mixed in `root` and nested folders,
    plus a text file. Returns kernel label -> source Series Instance UID."""
    a = make_ct_series(3, 32, 32, "Br40d", uid_seed="offline-a", series_number=3)
    b = make_ct_series(4, 32, 32, "Br40d", uid_seed="offline-b", series_number=5)
    c = make_ct_series(3, 32, 32, "Bl64d", uid_seed="offline-c", series_number=4)
    files = [(root / f"IM{i:04d}", ds) for i, ds in enumerate([*a[:2], *c[:2], *b[:2]])]
    files += [(root / "sub" / f"IM{i:04d}", ds) for i, ds in enumerate([a[2], b[2]])]
    files += [(root / "sub" / "deeper" / f"IM{i:04d}", ds) for i, ds in enumerate([c[2], b[3]])]
    _write(files)
    (root / "README.txt").write_text("exported by the PACS\n")
    return {
        "Br40d-a": str(a[0].SeriesInstanceUID),
        "Br40d-b": str(b[0].SeriesInstanceUID),
        "Bl64d": str(c[0].SeriesInstanceUID),
    }


def _derived_uid(source_uid: str) -> str:
    return derived_series_uid(source_uid, load_engine("linear-filter").identity)


def test_mixed_folder_follows_the_routes_and_two_jobs_write_what_one_job_writes(tmp_path, capsys):
    source = _mixed_folder(tmp_path / "in")
    assert main(["standardize", str(tmp_path / "in"), str(tmp_path / "one"), "--jobs", "1"]) == 0
    one_out, one_err = capsys.readouterr()
    assert main(["standardize", str(tmp_path / "in"), str(tmp_path / "two"), "--jobs", "2"]) == 0
    two_out, two_err = capsys.readouterr()

    expected = {_derived_uid(source["Br40d-a"]), _derived_uid(source["Br40d-b"])}
    assert {p.name for p in (tmp_path / "one").iterdir()} == expected, "Bl64d is not made"
    one, two = folder_contents(tmp_path / "one"), folder_contents(tmp_path / "two")
    assert len(one) == 7
    assert one == two, "2 workers must write the same UIDs and pixels as 1"

    for out, err, workers in ((one_out, one_err, "1 worker"), (two_out, two_err, "2 workers")):
        ignored, *lines = out.splitlines()
        assert ignored == "ignored 1 file that is not a CT image (not DICOM: 1)"
        assert lines[0] == (
            'series 4 "Thorax 1.0 Bl64d" (Bl64d, 3 files): skipped: no route matches: '
            "rule 'br40-to-bl64': ConvolutionKernel 'Bl64d' does not match ^Br40"
        ), out
        done = sorted(lines[1:3])
        assert done[0].startswith('series 3 "Thorax 1.0 Br40d" (Br40d, 3 files): 3 slices by ')
        assert done[1].startswith('series 5 "Thorax 1.0 Br40d" (Br40d, 4 files): 4 slices by ')
        for line in done:
            assert " on cpu (route br40-to-bl64; envelope none) -> " in line, line
        assert lines[3].startswith(
            "total: 3 series: 2 standardized, 1 skipped, 0 failed; 7 slices written in "
        )
        assert lines[3].endswith(f"({workers})")
        assert not any(name in out + err for name in PHI)


def test_all_standardizes_the_series_no_route_matches(tmp_path, capsys):
    source = _mixed_folder(tmp_path / "in")
    argv = ["standardize", str(tmp_path / "in"), str(tmp_path / "out"), "--all", "-j", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        _derived_uid(uid) for uid in source.values()
    }
    assert "(--all, no route; envelope none)" in out
    assert "total: 3 series: 3 standardized, 0 skipped, 0 failed" in out


def test_ctrl_c_stops_the_workers_and_leaves_no_partial_series(tmp_path, monkeypatch):
    for k in range(4):
        _write(
            [
                (tmp_path / "in" / f"s{k}" / f"{i}.dcm", ds)
                for i, ds in enumerate(make_ct_series(3, 32, 32, uid_seed=f"ctrl-c-{k}"))
            ]
        )
    config = parse_config({})
    plan = plan_jobs(scan_folder(tmp_path / "in").series, config, Overrides())
    assert len(plan.jobs) == 4
    before = set(multiprocessing.active_children())
    seen = []
    exit_codes: list[int | None] = []
    stop = offline_runner._stop

    def stop_and_look(pool):
        processes = list(pool._processes.values())
        stop(pool)
        exit_codes.extend(p.exitcode for p in processes)

    monkeypatch.setattr(offline_runner, "_stop", stop_and_look)

    def ctrl_c(job, outcome):
        seen.append(outcome)
        raise KeyboardInterrupt  # as if Ctrl-C came while the parent waits for the workers

    with pytest.raises(KeyboardInterrupt):
        run_plan(plan.jobs, config, tmp_path / "out", ("cpu", "cpu"), ctrl_c)
    assert len(seen) == 1
    assert exit_codes and None not in exit_codes, f"workers still running: {exit_codes}"
    assert not [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(PARTIAL_PREFIX)]
    assert set(multiprocessing.active_children()) - before == set(), "workers were stopped"


def test_an_engine_that_cannot_be_loaded_stops_the_run_as_a_configuration_error(tmp_path, capsys):
    _mixed_folder(tmp_path / "in")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a weights file")
    site = tmp_path / "site.toml"
    site.write_text(f'[engines.linear]\nweights = "{bad}"\n')
    argv = ["standardize", "-c", str(site), str(tmp_path / "in"), str(tmp_path / "out")]
    assert main(argv) == EXIT_CONFIG
    captured = capsys.readouterr()
    assert "configuration error: engine cannot be loaded: engine 'linear'" in captured.err
    assert "FAILED: engine 'linear' cannot be loaded" in captured.out


@pytest.mark.slow
def test_sigint_to_the_command_stops_it_with_exit_130_and_no_partial_series(tmp_path):
    """A real Ctrl-C (SIGINT to the terminal's process group) while two workers run."""
    for k in range(8):
        _write(
            [
                (tmp_path / "in" / f"s{k}" / f"{i}.dcm", ds)
                for i, ds in enumerate(make_ct_series(24, 256, 256, uid_seed=f"sigint-{k}"))
            ]
        )
    out = tmp_path / "out"
    argv = ["-m", "dicom_node.cli", "standardize", str(tmp_path / "in"), str(out), "-j", "2"]
    proc = subprocess.Popen(
        [sys.executable, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        first = proc.stdout.readline()  # one series done: the workers are busy with others
        assert "slices by linear-filter" in first, first
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err
    assert "interrupted: " in err and "unfinished output removed" in err
    finished = [p.name for p in out.iterdir()]
    assert finished and not [n for n in finished if n.startswith(PARTIAL_PREFIX)]
    assert len(finished) < 8
