"""A minimal storage SCP that writes what it receives into a folder: the demo's destination
archive and the component tests' PACS stand-in. Files land as
<root>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm, written durably like the node's spool.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node import statuses
from dicom_node.scp import ACCEPTED_TRANSFER_SYNTAXES, set_tcp_nodelay
from dicom_node.spool import Spool, SpoolError
from engine.dicom_facts import is_valid_uid


class FolderArchive:
    """Start with `start()`, read `port`, stop with `stop()`."""

    def __init__(
        self, root: Path, ae_title: str = "ARCHIVE", host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.spool = Spool(root)
        self.root = root
        self.ae_title = ae_title
        self.host = host
        self.requested_port = port
        self.server: Any = None
        self.received = 0

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        series, sop = ds.get("SeriesInstanceUID"), ds.get("SOPInstanceUID")
        if not (is_valid_uid(series) and is_valid_uid(sop)):
            return statuses.CANNOT_UNDERSTAND_INVALID_UID
        try:
            self.spool.store(series, sop, event.encoded_dataset())
        except SpoolError:
            return statuses.OUT_OF_RESOURCES
        self.received += 1
        return statuses.SUCCESS

    def start(self) -> FolderArchive:
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(Verification)
        for cx in StoragePresentationContexts[:127]:
            if cx.abstract_syntax:
                ae.add_supported_context(cx.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
        self.server = ae.start_server(
            (self.host, self.requested_port),
            block=False,
            evt_handlers=[
                (evt.EVT_C_STORE, self._on_store),
                (evt.EVT_C_ECHO, lambda e: statuses.SUCCESS),
                (evt.EVT_CONN_OPEN, set_tcp_nodelay),
            ],
        )
        return self

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def series_files(self, series_uid: str) -> list[Path]:
        d = self.root / series_uid
        return sorted(d.glob("*.dcm")) if d.is_dir() else []
