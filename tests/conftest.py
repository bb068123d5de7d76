"""Shared fixtures: synthetic CT series on disk, an embedded archive, and nodes on loopback ports
chosen by the OS (no fixed ports, no sleeps to wait for readiness: servers are bound when they
return)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests_support import node_config, write_series

from dicom_node.archive import FolderArchive
from dicom_node.config import NodeConfig
from dicom_node.logs import configure_logging
from dicom_node.service import Node


def pytest_configure(config: pytest.Config) -> None:
    configure_logging("console", "warning")


@pytest.fixture(autouse=True)
def _logging_to_current_stdout() -> None:
    """Tests that run `serve` or configure logging under capsys bind the log handler to a
    stream that is closed after them; rebind it to the current stdout before every test."""
    configure_logging("console", "warning")


@pytest.fixture
def br40_series(tmp_path: Path) -> list[Path]:
    return write_series(tmp_path / "br40")


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[FolderArchive]:
    a = FolderArchive(tmp_path / "archive").start()
    yield a
    a.stop()


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    nodes: list[Node] = []

    def start(
        config: NodeConfig | None = None, dest_port: int | None = None, **listener: object
    ) -> Node:
        node = Node(config or node_config(tmp_path / "state", dest_port, **listener))
        node.start()
        nodes.append(node)
        return node

    yield start
    for n in nodes:
        if n.server is not None and not n.stop_event.is_set():
            n.stop()
