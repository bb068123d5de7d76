"""The command line as an admin uses it, called in-process (main(argv) -> exit code)."""

import json
import socket

from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification
from tests_support import free_port, write_series

from dicom_node.cli import EXIT_CONFIG, main
from dicom_node.scp import set_tcp_nodelay
from engine.derived import derived_series_uid
from engine.ltdiff.engine import LTDiffEngine
from engine.ltdiff.weights import shipped_weights_path
from engine.registry import load_engine


def _site(tmp_path, body: str):
    p = tmp_path / "site.toml"
    p.write_text(f'[node]\nstate_dir = "{tmp_path / "state"}"\n' + body)
    return p


def test_check_config_prints_effective_config_and_warns_on_unreachable_destination(
    tmp_path, capsys
):
    cfg = _site(
        tmp_path,
        '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\n'
        f"port = {free_port()}\n",
    )
    assert main(["check-config", "-c", str(cfg)]) == 0
    out, err = capsys.readouterr()
    effective = json.loads(out)
    assert effective["listener"]["ae_title"] == "LTDIFF"
    assert effective["routes"][0]["destinations"] == ["pacs"]
    assert "warning: destination 'pacs'" in err and "not reachable" in err
    assert "configuration is valid" in err


def test_invalid_config_exits_78_with_the_key_named(tmp_path, capsys):
    cfg = _site(tmp_path, "[listener]\nae_title = 'THIS_AE_TITLE_IS_TOO_LONG'\n")
    assert main(["check-config", "-c", str(cfg)]) == EXIT_CONFIG
    assert "listener.ae_title" in capsys.readouterr().err


def test_echo_reports_success_and_failure(archive, capsys, tmp_path):
    cfg = _site(tmp_path, "")
    assert main(["echo", f"ARCHIVE@127.0.0.1:{archive.port}", "-c", str(cfg)]) == 0
    assert "C-ECHO success" in capsys.readouterr().out
    assert main(["echo", f"ARCHIVE@127.0.0.1:{free_port()}", "-c", str(cfg)]) == 1


def test_offline_standardize_writes_the_same_derived_series_as_the_node(tmp_path, capsys):
    src = write_series(tmp_path / "in", n_slices=4, uid_seed="offline")
    assert main(["standardize", str(tmp_path / "in"), str(tmp_path / "out")]) == 0
    source_uid = dcmread(src[0], stop_before_pixels=True).SeriesInstanceUID
    expected = derived_series_uid(source_uid, load_engine("linear-filter").identity)
    out = sorted((tmp_path / "out" / expected).glob("*.dcm"))
    assert len(out) == 4
    assert dcmread(out[0]).SeriesInstanceUID == expected


def test_phantom_command_writes_a_br40_series(tmp_path):
    assert main(["phantom", str(tmp_path / "ph"), "--slices", "2"]) == 0
    files = sorted((tmp_path / "ph").glob("*.dcm"))
    assert len(files) == 2
    ds = dcmread(files[0], stop_before_pixels=True)
    assert ds.Modality == "CT" and ds.ConvolutionKernel == "Br40d"


def test_export_sockets_disable_nagle(archive):
    """TCP_NODELAY on our SCU sockets: without it small PDUs wait for delayed ACKs (~40 ms)."""
    ae = AE(ae_title="LTDIFF")
    ae.add_requested_context(Verification)
    assoc = ae.associate(
        "127.0.0.1",
        archive.port,
        ae_title="ARCHIVE",
        evt_handlers=[(evt.EVT_CONN_OPEN, set_tcp_nodelay)],
    )
    try:
        sock = assoc.dul.socket.socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        assoc.release()


def test_engine_without_weights_is_a_configuration_error(tmp_path, capsys):
    """A learned engine configured without a weights file, of a kind that ships none, stops
    start-up (exit 78), instead of failing the first series the PACS sends."""
    cfg = _site(
        tmp_path,
        '[engines.learned]\nkind = "unetpp-regression"\n[[routes]]\nengine = "learned"\n',
    )
    assert main(["check-config", "-c", str(cfg)]) == EXIT_CONFIG
    assert "engine cannot be loaded" in capsys.readouterr().err
    assert main(["serve", "-c", str(cfg)]) == EXIT_CONFIG


def test_ltdiff_without_a_weights_path_uses_the_shipped_weights(tmp_path, capsys):
    cfg = _site(
        tmp_path,
        '[engines.std]\nkind = "ltdiff"\n[[routes]]\nengine = "std"\n',
    )
    assert main(["check-config", "-c", str(cfg)]) == 0
    err = capsys.readouterr().err
    shipped = LTDiffEngine.from_file(shipped_weights_path()).identity
    assert "engine 'std': ltdiff++" in err and shipped.settings in err
    assert shipped.weights_sha256[:12] in err
