"""The C-STORE handler decodes only the top-level attributes in scp.HEADER_KEYWORDS: every
attribute it reads from a received header (identifiers, routing, expected count, loop guard,
audit subject) must be in that list, or it would read None for an attribute the instance has."""

from __future__ import annotations

from io import BytesIO
from types import SimpleNamespace
from typing import Any
from unittest.mock import MagicMock

import pytest
from dicom_bytes import encode
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node import scp, statuses
from dicom_node.preflight import ReceptionLimits, read_header
from dicom_node.spool import Spool
from dicom_node.store import JobStore
from engine.synthetic import make_ct_series

_READ: set[str] = set()


class _Spy(Dataset):
    """A header that records which top-level attributes are read, however they are asked for."""

    def __getattr__(self, name: str) -> Any:
        if tag_for_keyword(name) is not None:
            _READ.add(name)
        return super().__getattr__(name)

    def get(self, key: Any, default: Any = None) -> Any:
        if isinstance(key, str) and tag_for_keyword(key) is not None:
            _READ.add(key)
        return super().get(key, default)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, int):
            _READ.add(keyword_for_tag(key) or hex(key))
        return super().__getitem__(key)

    def __contains__(self, name: Any) -> bool:
        if isinstance(name, str):
            _READ.add(name)
        return super().__contains__(name)


def _enhanced_ct() -> Dataset:
    path = get_testdata_file("eCT_Supplemental.dcm")
    assert path is not None
    ds = dcmread(path)
    recon = Dataset()
    recon.ConvolutionKernel = "Br40d"
    ds.SharedFunctionalGroupsSequence[0].CTReconstructionSequence = [recon]
    del ds.PixelData
    ds.preamble = None  # encode() writes the dataset alone
    return ds


def _ct() -> Dataset:
    (ds,) = make_ct_series(1, 16, 16, "Br40d", uid_seed="header-keywords")
    return ds


@pytest.mark.parametrize("make", [_ct, _enhanced_ct], ids=["ct", "enhanced-ct"])
def test_the_handler_reads_only_attributes_in_header_keywords(tmp_path, monkeypatch, make):
    ds = make()
    encoded = encode(ds)
    whole = read_header(encoded, ExplicitVRLittleEndian, ReceptionLimits())  # every element
    spy = _Spy()
    for elem in whole:
        spy.add(elem)
    monkeypatch.setattr(scp, "read_header", lambda *_args, **_kwargs: spy)
    _READ.clear()
    audit = MagicMock()  # with the audit trail on, the handler reads the audit subject too
    store = JobStore(tmp_path / "node.db")
    handler = scp.StoreHandler(Spool(tmp_path / "spool"), store, ReceptionLimits(), audit=audit)
    event = SimpleNamespace(
        request=SimpleNamespace(
            DataSet=BytesIO(encoded),
            AffectedSOPInstanceUID=ds.SOPInstanceUID,
            AffectedSOPClassUID=ds.SOPClassUID,
        ),
        context=SimpleNamespace(transfer_syntax=ExplicitVRLittleEndian),
        assoc=SimpleNamespace(
            requestor=SimpleNamespace(ae_title="PACS", address="127.0.0.1"), native_id=1
        ),
    )
    assert handler(event) == statuses.SUCCESS  # type: ignore[arg-type]
    assert audit.instance_receiving.called
    assert store.has_instance(str(ds.SOPInstanceUID))
    store.close()
    missing = sorted(_READ - set(scp.HEADER_KEYWORDS))
    assert not missing, f"the handler reads {missing}: add them to scp.HEADER_KEYWORDS"
    assert {"SOPInstanceUID", "SeriesInstanceUID", "ImageType"} <= _READ, "the spy saw reads"


def test_header_tags_are_the_tags_of_header_keywords():
    assert {tag_for_keyword(k) for k in scp.HEADER_KEYWORDS} == scp.HEADER_TAGS
    assert None not in scp.HEADER_TAGS


def test_the_subset_read_by_the_handler_routes_like_the_whole_header():
    ds = _enhanced_ct()
    encoded = encode(ds)
    whole = read_header(encoded, ExplicitVRLittleEndian, ReceptionLimits())
    subset = read_header(encoded, ExplicitVRLittleEndian, ReceptionLimits(), tags=scp.HEADER_TAGS)
    assert scp.routing_header(subset)["ConvolutionKernel"] == "Br40d", "from the functional groups"
    assert scp._describe(subset) == scp._describe(whole)
