"""CPU engine processes that share the cores split them instead of oversubscribing them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine.cpu_threads import available_cpus, threads_per_process


@pytest.mark.parametrize(
    ("sharing", "cpus", "expected"),
    [(1, 2, 2), (2, 2, 1), (3, 2, 1), (2, 16, 8), (3, 16, 5), (0, 4, 4)],
)
def test_each_process_takes_its_share_of_the_cores_and_at_least_one(
    sharing: int, cpus: int, expected: int
) -> None:
    assert threads_per_process(sharing, cpus) == expected


def test_share_cpus_sets_torch_threads_in_the_process_that_calls_it() -> None:
    code = (
        "import torch; from engine.cpu_threads import share_cpus; "
        "n = share_cpus(2); print(n, torch.get_num_threads())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    expected = max(1, available_cpus() // 2)
    assert out == [str(expected), str(expected)]
