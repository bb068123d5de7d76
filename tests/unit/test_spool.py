"""The spool writes durably under validated UID names and refuses when it cannot."""

import os

import pytest

from dicom_node.spool import Spool, SpoolError
from dicom_node.uids import is_valid_uid


@pytest.mark.parametrize("uid", ["1.2.840.10008.5.1.4.1.1.2", "2.25.1234567890", "1.0.3"])
def test_valid_uids(uid):
    assert is_valid_uid(uid)


@pytest.mark.parametrize(
    "uid",
    [
        "",
        "1",
        "1..2",
        "1.02",
        "../../etc/passwd",
        "1.2/3",
        "1.2.3\x00",
        "a.b",
        "1." + "1" * 63,
        None,
        1.2,
    ],
)
def test_invalid_uids_never_reach_a_path(uid):
    assert not is_valid_uid(uid)


def test_store_writes_file_atomically_under_series_folder(tmp_path):
    spool = Spool(tmp_path)
    p, created = spool.store("1.2.3", "1.2.3.4", b"DICM-bytes")
    assert created
    assert p == tmp_path / "1.2.3" / "1.2.3.4.dcm"
    assert p.read_bytes() == b"DICM-bytes"
    assert [x.name for x in p.parent.iterdir()] == ["1.2.3.4.dcm"], "no temporary file left behind"


def test_path_traversal_uid_is_refused(tmp_path):
    with pytest.raises(ValueError, match="invalid UID"):
        Spool(tmp_path).store("..", "1.2.3", b"x")


def test_unwritable_spool_raises_spool_error(tmp_path):
    if os.geteuid() == 0:
        # root ignores permissions; make the series folder a file instead
        (tmp_path / "1.2.3").write_text("not a folder")
    else:
        tmp_path.chmod(0o500)
    with pytest.raises(SpoolError, match="cannot write to the spool"):
        Spool(tmp_path).store("1.2.3", "1.2.3.4", b"x")


def test_minimum_free_space_refuses_before_writing(tmp_path):
    spool = Spool(tmp_path, min_free_bytes=1 << 62)
    with pytest.raises(SpoolError, match="free disk space below"):
        spool.store("1.2.3", "1.2.3.4", b"x")
    assert not (tmp_path / "1.2.3" / "1.2.3.4.dcm").exists()
