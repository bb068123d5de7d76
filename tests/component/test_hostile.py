"""Hostile datasets of the fault campaign, sent byte for byte with HostileSCU to a real node on
loopback: each gets its documented status, nothing of it is kept, and the node keeps serving."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest
from dicom_bytes import deflate, deflate_bomb, encode, nested_sequence
from hostile_scu import HostileSCU
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from tests_support import node_config

from dicom_node import statuses
from dicom_node.preflight import ReceptionLimits
from dicom_node.service import Node
from engine.synthetic import make_ct_series

CONTEXTS = [
    (CTImageStorage, [ExplicitVRLittleEndian]),
    (CTImageStorage, [DeflatedExplicitVRLittleEndian]),
]


def _ct(seed: str):
    (ds,) = make_ct_series(1, 32, 32, "Br40d", uid_seed=seed)
    return ds


def _store(node: Node, data: bytes, ds, syntax: str = ExplicitVRLittleEndian) -> int | None:
    with HostileSCU(
        "127.0.0.1", node.port, called_ae="LTDIFF", calling_ae="HOSTILE", contexts=CONTEXTS
    ) as scu:
        return scu.c_store(
            data,
            sop_class=CTImageStorage,
            sop_instance=str(ds.SOPInstanceUID),
            transfer_syntax=syntax,
        )


def _spooled_files(node: Node) -> list[Path]:
    return [p for p in node.config.spool_dir.rglob("*") if p.is_file()]


def _still_serving(node: Node, seed: str) -> None:
    ds = _ct(seed)
    assert _store(node, encode(ds), ds) == statuses.SUCCESS
    assert node.store.has_instance(str(ds.SOPInstanceUID))


def _split_at_group_0020(encoded: bytes) -> int:
    """Offset of the first element of group 0020 or later in an explicit VR LE dataset, where a
    group 0018 sequence can be inserted in tag order."""
    pos = 0
    while pos < len(encoded):
        group = int.from_bytes(encoded[pos : pos + 2], "little")
        if group >= 0x0020:
            return pos
        vr = encoded[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"SQ", b"UN", b"UT", b"UC", b"UR", b"OD", b"OF", b"OL"):
            pos += 12 + int.from_bytes(encoded[pos + 8 : pos + 12], "little")
        else:
            pos += 8 + int.from_bytes(encoded[pos + 6 : pos + 8], "little")
    return pos


def test_poison_pill_with_sequences_nested_300_deep_is_refused_at_reception(start_node):
    """Defect 1: a CT instance whose ContributingEquipmentSequence was nested ~300 levels deep
    (6 KB) was answered Success; building its derived series grew the node past 7 GB."""
    node = start_node()
    ds = _ct("poison")
    encoded = encode(ds)
    at = _split_at_group_0020(encoded)
    poison = encoded[:at] + nested_sequence(300) + encoded[at:]
    assert _store(node, poison, ds) == statuses.CANNOT_UNDERSTAND_LIMIT_EXCEEDED
    assert _spooled_files(node) == [] and not node.store.has_instance(str(ds.SOPInstanceUID))
    _still_serving(node, "after-poison")


def test_nesting_within_the_limit_is_stored(start_node):
    node = start_node()
    ds = _ct("nested-ok")
    encoded = encode(ds)
    at = _split_at_group_0020(encoded)
    assert _store(node, encoded[:at] + nested_sequence(3) + encoded[at:], ds) == statuses.SUCCESS


def test_two_deflate_bombs_at_once_are_refused_at_the_cap(tmp_path):
    """Defect 2: a 1.8 MB Deflated Explicit VR Little Endian instance inflated to 3.1 GB in the
    node; two at once killed it. Inflation stops at listener.limits.max_dataset_mb."""
    base = node_config(tmp_path / "state", None)
    cfg = dataclasses.replace(
        base,
        listener=dataclasses.replace(
            base.listener, limits=ReceptionLimits(max_dataset_bytes=32 << 20)
        ),
    )
    node = Node(cfg)
    node.start()
    try:
        bombs = []
        for seed in ("bomb-1", "bomb-2"):
            ds = _ct(seed)
            bombs.append((ds, deflate_bomb(encode(ds), 3100)))
        results: list[int | None] = []

        def send(ds, bomb) -> None:
            results.append(_store(node, bomb, ds, DeflatedExplicitVRLittleEndian))

        threads = [threading.Thread(target=send, args=pair) for pair in bombs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [statuses.CANNOT_UNDERSTAND_LIMIT_EXCEEDED] * 2
        assert _spooled_files(node) == []
        ds = _ct("deflated-ok")
        assert _store(node, deflate(encode(ds)), ds, DeflatedExplicitVRLittleEndian) == (
            statuses.SUCCESS
        )
    finally:
        node.stop()


def test_an_unreadable_routing_attribute_is_refused_before_anything_is_written(start_node):
    """Defect 9: Modality with VR CO broke the routing header after the spool write, answered
    pynetdicom's generic failure and left a file no record pointed to."""
    node = start_node()
    ds = _ct("modality-co")
    encoded = encode(ds)
    at = encoded.find(b"\x08\x00\x60\x00CS")
    assert at >= 0
    patched = encoded[:at] + b"\x08\x00\x60\x00CO" + encoded[at + 6 :]
    assert _store(node, patched, ds) == statuses.CANNOT_UNDERSTAND
    assert _spooled_files(node) == []
    _still_serving(node, "after-co")


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        # SOPClassUID's length field patched to 720: the value runs past the end
        (
            lambda b: b.replace(b"\x08\x00\x16\x00UI\x1a\x00", b"\x08\x00\x16\x00UI\xd0\x02", 1),
            statuses.CANNOT_UNDERSTAND,
        ),
        (lambda b: b[: len(b) // 2], statuses.CANNOT_UNDERSTAND),
        (lambda b: b"\xff" * 64, statuses.CANNOT_UNDERSTAND),
        (
            lambda b: b + b"\xfe\xff\x0d\xe0\0\0\0\0",
            statuses.CANNOT_UNDERSTAND,
        ),
    ],
    ids=["sop-class-length-720", "truncated", "junk", "stray-item-delimiter"],
)
def test_malformed_datasets_get_cannot_understand_and_leave_nothing(start_node, mutate, expected):
    node = start_node()
    ds = _ct("malformed")
    assert _store(node, mutate(encode(ds)), ds) == expected
    assert _spooled_files(node) == []
    _still_serving(node, "after-malformed")
