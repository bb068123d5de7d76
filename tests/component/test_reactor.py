"""dicom_node/reactor.py with real pynetdicom peers on loopback: the listener's accepted
associations wait for work instead of polling, and still do everything pynetdicom's loops do
(C-ECHO, C-STORE, release, abort, the network timeout, ARTIM, TLS); the node's own SCU
associations are pynetdicom's, untouched."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from typing import Any

import pytest
from listener_support import self_signed
from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom._handlers import standard_dimse_recv_handler
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from pynetdicom.transport import AddressInformation, AssociationSocket
from tests_support import require_tool, wait_until

from dicom_node import dimse_guard, reactor
from dicom_node.admission import AdmissionPolicy, AdmissionServer, start_admission_server
from dicom_node.config import TLSConfig
from dicom_node.scp import ACCEPTED_TRANSFER_SYNTAXES
from dicom_node.tls import make_ssl_context
from engine.synthetic import make_ct_dataset


class _Served:
    """What the server's handlers saw: the server-side associations and the stored datasets."""

    def __init__(self) -> None:
        self.associations: list[Association] = []
        self.stored: dict[str, bytes] = {}
        self.lock = threading.Lock()

    def opened(self, event: evt.Event) -> None:
        with self.lock:
            self.associations.append(event.assoc)

    def store(self, event: evt.Event) -> int:
        with self.lock:
            self.stored[str(event.request.AffectedSOPInstanceUID)] = event.encoded_dataset()
        return 0x0000


@pytest.fixture
def serve() -> Iterator[Callable[..., tuple[AdmissionServer, _Served]]]:
    servers: list[AdmissionServer] = []

    def start(
        network_timeout_s: float = 30.0, ssl_context: Any = None
    ) -> tuple[AdmissionServer, _Served]:
        served = _Served()
        ae = AE(ae_title="LTDIFF")
        ae.network_timeout = network_timeout_s
        ae.add_supported_context(Verification)
        ae.add_supported_context(CTImageStorage, ACCEPTED_TRANSFER_SYNTAXES)
        server = start_admission_server(
            ae,
            ("127.0.0.1", 0),
            AdmissionPolicy(network_timeout_s=network_timeout_s),
            evt_handlers=[
                (evt.EVT_C_ECHO, lambda _event: 0x0000),
                (evt.EVT_C_STORE, served.store),
                (evt.EVT_CONN_OPEN, dimse_guard.install),
                (evt.EVT_CONN_OPEN, served.opened),
            ],
            ssl_context=ssl_context,
        )
        servers.append(server)
        return server, served

    yield start
    for server in servers:
        if server.serving:  # not shut down by the test itself
            server.shutdown()


def _associate(server: AdmissionServer, **kwargs: Any) -> Association:
    ae = AE(ae_title="PACS")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", server.server_address[1], ae_title="LTDIFF", **kwargs)
    assert assoc.is_established, "no association"
    return assoc


def _threads_ended(assoc: Association) -> Callable[[], bool]:
    return lambda: not assoc.is_alive() and not assoc.dul.is_alive()


def test_accepted_associations_are_event_driven_and_serve_echo_and_store(serve):
    server, served = serve()
    scu = _associate(server)
    try:
        assert scu.send_c_echo().Status == 0x0000
        datasets = [make_ct_dataset(rows=256, cols=256, instance_number=i) for i in range(1, 4)]
        for ds in datasets:
            assert scu.send_c_store(ds).Status == 0x0000
    finally:
        scu.release()
    (assoc,) = served.associations
    assert isinstance(assoc, reactor.EventDrivenAssociation)
    assert isinstance(assoc.dul, reactor.EventDrivenDUL)
    assert isinstance(assoc.dimse, dimse_guard.GuardedDIMSEProvider), "dimse_guard still applies"
    assert isinstance(assoc.dimse.msg_queue, reactor.SignallingQueue)
    for ds in datasets:
        stored = dcmread(BytesIO(served.stored[str(ds.SOPInstanceUID)]))
        assert stored.PixelData == ds.PixelData
    wait_until(_threads_ended(assoc), what="the released association's threads to end")
    assert assoc.is_released
    # the exporter's side (here the test's SCU) is pynetdicom's own
    assert type(scu) is Association
    assert type(scu.dul) is DULServiceProvider


def test_a_guarded_store_request_is_converted_to_a_primitive_once(serve, monkeypatch):
    """dimse_guard converts each request to judge it; pynetdicom gets that conversion instead
    of converting the message a second time (about 0.3 ms an instance)."""
    from pynetdicom.dimse_messages import DIMSEMessage

    conversions: list[int] = []
    convert = DIMSEMessage.message_to_primitive

    def counted(self: Any) -> Any:
        if self.command_set.CommandField == dimse_guard.C_STORE_RQ:  # not the SCU's responses
            conversions.append(1)
        return convert(self)

    monkeypatch.setattr(DIMSEMessage, "message_to_primitive", counted)
    server, served = serve()
    scu = _associate(server)
    try:
        for i in range(1, 4):
            ds = make_ct_dataset(rows=64, cols=64, instance_number=i)
            assert scu.send_c_store(ds).Status == 0x0000
    finally:
        scu.release()
    assert len(served.stored) == 3
    assert len(conversions) == 3


def test_an_idle_association_waits_instead_of_polling(serve, monkeypatch):
    """pynetdicom's loops run about 1000 passes a second each while idle; the event-driven
    ones one pass per WAIT_BOUND_S at most (fewer on a busy machine, never more)."""
    passes = {"dul": 0, "assoc": 0}
    dul_pass = reactor.EventDrivenDUL._process_recv_primitive
    get_msg = dimse_guard.GuardedDIMSEProvider.get_msg

    def counted_dul_pass(self: Any) -> bool:
        passes["dul"] += 1
        return dul_pass(self)

    def counted_get_msg(self: Any, block: bool = False) -> Any:
        passes["assoc"] += 1
        return get_msg(self, block)

    monkeypatch.setattr(reactor.EventDrivenDUL, "_process_recv_primitive", counted_dul_pass)
    monkeypatch.setattr(dimse_guard.GuardedDIMSEProvider, "get_msg", counted_get_msg)
    server, _served = serve()
    scu = _associate(server)
    try:
        assert scu.send_c_echo().Status == 0x0000
        start = dict(passes)
        t0 = time.monotonic()
        threading.Event().wait(0.6)  # the association stays idle for this long
        idle_s = time.monotonic() - t0
        most = idle_s / reactor.WAIT_BOUND_S + 3
        dul_passes = passes["dul"] - start["dul"]
        assoc_passes = passes["assoc"] - start["assoc"]
        assert dul_passes <= most, f"DUL: {dul_passes} passes in {idle_s:.2f} s idle"
        assert assoc_passes <= most, f"association: {assoc_passes} passes in {idle_s:.2f} s"
        assert scu.send_c_echo().Status == 0x0000, "and it still answers at once when asked"
    finally:
        scu.release()


def test_peer_abort_ends_the_association(serve):
    server, served = serve()
    scu = _associate(server)
    assert scu.send_c_echo().Status == 0x0000
    scu.abort()
    (assoc,) = served.associations
    wait_until(_threads_ended(assoc), what="the aborted association's threads to end")
    assert assoc.is_aborted
    assert not assoc.is_established


def test_network_timeout_aborts_an_idle_association(serve):
    server, served = serve(network_timeout_s=1.0)
    scu = _associate(server)  # and then nothing
    (assoc,) = served.associations
    wait_until(lambda: scu.is_aborted, timeout=20, what="the node to abort the idle association")
    wait_until(_threads_ended(assoc), what="the timed-out association's threads to end")
    assert assoc.is_aborted


def test_server_shutdown_ends_open_associations(serve):
    server, served = serve()
    scu = _associate(server)
    assert scu.send_c_echo().Status == 0x0000
    (assoc,) = served.associations
    server.shutdown()
    wait_until(_threads_ended(assoc), what="the association's threads to end at shutdown")
    wait_until(lambda: not scu.is_established, what="the peer to see the association end")


def test_artim_expiry_closes_a_connection_without_traffic():
    """ARTIM (PS3.8 9.1.5) runs from the transport connection until the A-ASSOCIATE-RQ: its
    expiry must be noticed while the DUL waits in select() for a peer that sends nothing."""
    ae = AE(ae_title="LTDIFF")
    ae.acse_timeout = 0.3  # pynetdicom's ARTIM timeout is the ACSE timeout
    ours, peer = socket.socketpair()
    try:
        assoc = Association(ae, "acceptor")
        assoc.requestor.address_info = AddressInformation("127.0.0.1", 104)
        assoc.set_socket(AssociationSocket(assoc, client_socket=ours))
        reactor.adapt(assoc)
        assoc.dul.start()  # the DUL alone: Evt5 (connection), then ARTIM in Sta2
        wait_until(
            lambda: assoc.dul.state_machine.current_state == "Sta1",
            what="ARTIM expiry to take the state machine back to Sta1",
        )
        peer.settimeout(10)
        assert peer.recv(1) == b"", "the node closed the connection at ARTIM expiry"
        assoc.dul.kill_dul()
        wait_until(lambda: not assoc.dul.is_alive(), what="the DUL thread to end")
    finally:
        peer.close()


@pytest.fixture
def tls_context(tmp_path):
    key, cert = self_signed(require_tool("openssl"), tmp_path, "node", "localhost")
    server = make_ssl_context(TLSConfig(enabled=True, certificate=cert, private_key=key), True)
    client = make_ssl_context(TLSConfig(enabled=True, ca_certificates=cert), False)
    return server, client


def test_tls_associations_store_large_instances(serve, tls_context):
    """Over TLS, decrypted bytes can wait in the SSL object where select() does not see them:
    the DUL must read them without waiting for more traffic."""
    server_context, client_context = tls_context
    server, served = serve(ssl_context=server_context)
    scu = _associate(server, tls_args=(client_context, "localhost"))
    try:
        datasets = [make_ct_dataset(rows=512, cols=512, instance_number=i) for i in range(1, 4)]
        for ds in datasets:
            assert scu.send_c_store(ds).Status == 0x0000
    finally:
        scu.release()
    (assoc,) = served.associations
    assert isinstance(assoc, reactor.EventDrivenAssociation)
    for ds in datasets:
        assert dcmread(BytesIO(served.stored[str(ds.SOPInstanceUID)])).PixelData == ds.PixelData


def test_missing_pynetdicom_internals_fail_at_start_up_naming_them(monkeypatch):
    reactor.check_pynetdicom_internals(AE())  # the installed pynetdicom has them all
    monkeypatch.delattr(DULServiceProvider, "_read_pdu_data")
    with pytest.raises(reactor.PynetdicomInternalsError, match=r"DULServiceProvider\._read_pdu"):
        reactor.check_pynetdicom_internals(AE())


@pytest.mark.parametrize(("level", "bound"), [(logging.WARNING, False), (logging.DEBUG, True)])
def test_pynetdicoms_logging_handlers_are_unbound_only_when_their_lines_would_be_dropped(
    serve, level, bound
):
    logger = logging.getLogger("pynetdicom")
    before = logger.level
    logger.setLevel(level)
    try:
        server, served = serve()
        scu = _associate(server)
        try:
            assert scu.send_c_echo().Status == 0x0000
        finally:
            scu.release()
    finally:
        logger.setLevel(before)
    (assoc,) = served.associations
    handlers = [handler for handler, _args in assoc.get_handlers(evt.EVT_DIMSE_RECV)]
    assert (standard_dimse_recv_handler in handlers) is bound
    # the exporter's associations always keep them
    assert standard_dimse_recv_handler in [h for h, _ in scu.get_handlers(evt.EVT_DIMSE_RECV)]


def test_store_responses_are_encoded_directly_and_read_by_the_peer(serve, monkeypatch):
    encoded = []
    real = reactor.encode_store_response

    def recording(rsp: Any) -> bytes | None:
        result = real(rsp)
        encoded.append(result)
        return result

    monkeypatch.setattr(reactor, "encode_store_response", recording)
    server, _served = serve()
    scu = _associate(server)
    try:
        ds = make_ct_dataset(rows=16, cols=16)
        rsp = scu.send_c_store(ds)
    finally:
        scu.release()
    assert rsp.Status == 0x0000  # pynetdicom matched it to its request by the Message ID
    assert len(encoded) == 1 and encoded[0] is not None, "the response took the direct path"
