"""Real peers for interop tests: Orthanc (the PACS) started with a temporary configuration on
free loopback ports, and DCMTK's command-line tools (the modality); tests/peer_support.py starts
them. Under CI a missing peer fails the tests (tests_support.require_tool); elsewhere they skip
with the install command."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from peer_support import Orthanc, orthanc_executable, start_orthanc
from tests_support import require_tool

pytestmark = pytest.mark.interop


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    o = start_orthanc(orthanc_executable() or require_tool("Orthanc"), tmp_path / "orthanc")
    yield o
    o.stop()


@pytest.fixture
def storescu() -> str:
    return require_tool("storescu")


@pytest.fixture
def echoscu() -> str:
    return require_tool("echoscu")
