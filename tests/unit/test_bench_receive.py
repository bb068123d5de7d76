"""The reception benchmark's pure parts (benchmarks/bench_receive.py): arguments, the split of
files over associations, the table of medians and ratios, and the profile report. No peers."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest
from bench_support import load_benchmark

_load = load_benchmark


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _load("bench_receive")


def test_defaults_are_300_instances_3_repeats_1_and_4_associations_every_receiver(
    bench: ModuleType,
) -> None:
    args = bench.parse_args([])
    assert (args.instances, args.repeats, args.associations) == (300, 3, (1, 4))
    assert args.receivers == ("storescp", "orthanc", "pynetdicom", "node")
    assert args.profile is None


def test_receivers_subset_keeps_table_order_and_unknown_names_are_refused(
    bench: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    assert bench.parse_args(["--receivers", "node, storescp,node"]).receivers == (
        "storescp",
        "node",
    )
    with pytest.raises(SystemExit):
        bench.parse_args(["--receivers", "node,pacs"])
    assert "unknown receiver(s) pacs" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--associations", "0"],
        ["--associations", "x"],
        ["--associations", ","],
        ["--instances", "3", "--associations", "4"],
        ["--repeats", "0"],
        ["--cprofile"],
    ],
)
def test_invalid_arguments_stop_with_a_usage_error(bench: ModuleType, argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(argv)
    assert exc.value.code == 2


def test_association_counts_are_sorted_and_deduplicated(bench: ModuleType) -> None:
    assert bench.parse_args(["--associations", "4,1,4"]).associations == (1, 4)


def test_files_split_into_contiguous_near_equal_parts_in_order(bench: ModuleType) -> None:
    files = [Path(f"{i}.dcm") for i in range(10)]
    parts = bench.split_files(files, 4)
    assert [len(p) for p in parts] == [3, 3, 2, 2]
    assert [f for p in parts for f in p] == files
    assert bench.split_files(files[:2], 4) == [[files[0]], [files[1]]]  # no empty sender


def test_table_shows_medians_failed_cells_ratios_and_skipped_receivers(
    bench: ModuleType,
) -> None:
    rates = {
        ("storescp", 1): [700.0, 800.0, 900.0],
        ("storescp", 4): [1000.0],
        ("orthanc", 1): [150.0, 140.0, 160.0],
        ("orthanc", 4): [],  # every trial failed
        ("node", 1): [100.0, 75.0],
        ("node", 4): [90.0],
    }
    med = bench.medians(rates)
    assert med[("node", 1)] == 87.5
    assert ("orthanc", 4) not in med
    table = bench.format_table(
        med,
        ("storescp", "orthanc", "pynetdicom", "node"),
        (1, 4),
        skipped={"pynetdicom": "not installed"},
    )
    lines = table.splitlines()
    assert lines[0] == "| receiver | 1 association | 4 associations |"
    assert "| DCMTK storescp (no fsync) | 800 | 1000 |" in lines
    assert "| Orthanc (fsync per file) | 150 | failed |" in lines
    assert "| ltdiff-node | 88 | 90 |" in lines
    assert "| node / orthanc | 0.58x | n/a |" in lines
    assert "| node / storescp | 0.11x | 0.09x |" in lines
    assert not any(line.startswith("| pynetdicom") for line in lines)
    assert lines[-1] == "skipped pynetdicom: not installed"


def test_no_ratio_row_for_a_receiver_not_benchmarked(bench: ModuleType) -> None:
    table = bench.format_table({("node", 1): 90.0}, ("node",), (1,))
    assert "node / " not in table


def test_profile_report_sums_processes_per_instance(tmp_path: Path) -> None:
    profile = _load("receive_profile")
    for pid, wall0 in ((1, 10.0), (2, 50.0)):
        stages = {"handler": [0.3, 50], "record_instance": [0.05, 50], "fsync": [0.1, 100]}
        span = {"wall0": wall0, "wall1": wall0 + 0.49, "cpu0": 1.0, "cpu1": 1.245, "calls": 50}
        (tmp_path / f"stages-{pid}.json").write_text(json.dumps({"stages": stages, "span": span}))
    report = profile.report(tmp_path)
    assert "wall 10.00 ms, node process CPU (all threads) 5.00 ms" in report
    assert "| handler | serve_request | 6.00 | 1.0 |" in report
    assert "| record_instance | handler | 1.00 | 1.0 |" in report
    assert "| fsync | - | 2.00 | 2.0 |" in report
    assert "no instance recorded" in profile.report(tmp_path / "empty")


def test_ratios_within_each_run_pair_trials_of_the_same_repeat_only(bench: ModuleType) -> None:
    runs = {
        ("node", 1, 0): 100.0,
        ("orthanc", 1, 0): 200.0,
        ("node", 1, 1): 150.0,  # its orthanc trial failed: no ratio for repeat 1
        ("node", 1, 2): 300.0,
        ("orthanc", 1, 2): 200.0,
        ("node", 4, 0): 90.0,
    }
    assert bench.paired_ratios(runs, "node", "orthanc", 1) == [0.5, 1.5]
    assert bench.paired_ratios(runs, "node", "orthanc", 4) == []
    text = bench.format_paired(runs, ("node", "orthanc"), (1, 4))
    assert text == "node / orthanc, 1 association: per run 0.50 1.50; median 1.00x (0.50-1.50)"


def test_loads_default_to_none_keep_their_order_and_unknown_loads_are_refused(
    bench: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    assert bench.parse_args([]).load == ("none",)
    assert bench.parse_args(["--load", "engine-idle, none,engine"]).load == (
        "none",
        "engine",
        "engine-idle",
    )
    with pytest.raises(SystemExit):
        bench.parse_args(["--load", "engine,gpu"])
    assert "unknown load(s) gpu" in capsys.readouterr().err


def test_a_loaded_trial_has_its_own_row_its_ratios_and_its_busy_over_idle(
    bench: ModuleType,
) -> None:
    assert bench.trial_name("node", "none") == "node"
    assert bench.trial_name("node", "engine") == "node+engine"
    med = {
        ("orthanc", 1): 200.0,
        ("orthanc+engine", 1): 160.0,
        ("node", 1): 250.0,
        ("node+engine", 1): 200.0,
    }
    lines = bench.format_table(med, ("orthanc", "node"), (1,), loads=("none", "engine")).split("\n")
    assert "| Orthanc (fsync per file), engine load (nice 10) | 160 |" in lines
    assert "| ltdiff-node, engine load (nice 10) | 200 |" in lines
    assert "| node / orthanc | 1.25x |" in lines
    assert "| node+engine / orthanc+engine | 1.25x |" in lines
    assert "| orthanc+engine / orthanc | 0.80x |" in lines
    assert "| node+engine / node | 0.80x |" in lines
    # Without an unloaded trial there is no busy / idle to print.
    only_loaded = bench.format_table(med, ("orthanc", "node"), (1,), loads=("engine",))
    assert "| node+engine / orthanc+engine | 1.25x |" in only_loaded
    assert "node+engine / node" not in only_loaded


def test_busy_over_idle_within_each_run_pairs_a_receivers_trials_of_the_same_repeat(
    bench: ModuleType,
) -> None:
    runs = {
        ("node", 1, 0): 200.0,
        ("node+engine-idle", 1, 0): 150.0,
        ("node", 1, 1): 100.0,
        ("node+engine-idle", 1, 1): 90.0,
    }
    text = bench.format_paired(runs, ("node",), (1,), ("none", "engine-idle"))
    assert text == (
        "node+engine-idle / node, 1 association: per run 0.75 0.90; median 0.82x (0.75-0.90)"
    )
