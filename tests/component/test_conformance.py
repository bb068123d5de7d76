"""docs/CONFORMANCE.md cannot drift from the code.

The statement's machine-checked tables are marked `<!-- conformance-table: NAME -->`. These
tests read them and compare, as sets (and as ordered lists where the order is part of the
statement: preference and proposal order), with:

- the real listener (`dicom_node.scp.start_listener`) on a loopback port: a pynetdicom SCU
  proposes every SOP class pynetdicom knows and every transfer syntax pydicom knows, and records
  what the node accepts, in both `listener.other_storage` modes;
- the presentation contexts `dicom_node.scp.build_ae` configures (the same function the
  listener uses), so a UID outside the probes cannot hide;
- the export SCU (`dicom_node.export`): what it proposes for a real derived series and for a
  C-ECHO, captured by an in-process SCP;
- the status constants of `dicom_node.statuses`, the statuses the export counts as stored, the
  implementation identification on the wire and in the derived files' meta, and the attributes
  of a derived instance.

A failure names the table and each UID missing on either side.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pynetdicom.presentation
import pytest
from pydicom import Dataset, dcmwrite
from pydicom.datadict import tag_for_keyword
from pydicom.tag import Tag
from pydicom.uid import UID, AllTransferSyntaxes
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import AsynchronousOperationsWindowNegotiation
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from dicom_node import export, statuses
from dicom_node.config import DestinationConfig, ListenerConfig, OtherStorage
from dicom_node.scp import build_ae, start_listener
from dicom_node.spool import Spool
from dicom_node.store import JobStore
from engine.derived import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    build_derived_series,
)
from engine.interface import EngineIdentity
from engine.series_io import load_series
from engine.synthetic import make_ct_series

DOC = Path(__file__).resolve().parents[2] / "docs" / "CONFORMANCE.md"
VERIFICATION = str(Verification)
MAX_CONTEXTS = 128  # presentation contexts in one A-ASSOCIATE-RQ (odd IDs 1..255, PS3.8 9.3.2.2)

TABLES = (
    "scp-sop-classes",
    "scp-other-storage-sop-classes",
    "implementation",
    "scp-storage-transfer-syntaxes",
    "scp-verification-transfer-syntaxes",
    "scp-statuses",
    "scu-derived-transfer-syntaxes",
    "scu-verification-transfer-syntaxes",
    "scu-derived-sop-classes",
    "scu-stored-statuses",
    "derived-attributes",
)
# Rows of the `implementation` table, by their first cell.
ASSOCIATION_UID = "Implementation Class UID (associations, SCP and SCU)"
ASSOCIATION_VERSION = "Implementation Version Name (associations, SCP and SCU)"
MAX_PDU = "Maximum PDU length received (SCP and SCU)"
FILE_META_UID = "Implementation Class UID (file meta of derived instances)"
FILE_META_VERSION = "Implementation Version Name (file meta of derived instances)"

# ---- reading the marked tables ------------------------------------------------------------------

_MARKER = re.compile(r"<!-- conformance-table: ([a-z0-9-]+) -->")
_CODE = re.compile(r"`([^`]+)`")
_TAG = re.compile(r"\(([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)")


@dataclass(frozen=True)
class Table:
    name: str
    rows: tuple[dict[str, str], ...]  # header -> cell text

    def cells(self, column: str) -> list[str]:
        if self.rows and column not in self.rows[0]:
            raise AssertionError(f"table {self.name}: no column {column!r} ({list(self.rows[0])})")
        return [row[column] for row in self.rows]

    def values(self, column: str) -> list[str]:
        """The one `code` value of each row's cell in `column`, in row order."""
        out = []
        for cell in self.cells(column):
            found = _CODE.findall(cell)
            if len(found) != 1:
                raise AssertionError(
                    f"table {self.name}, column {column!r}: expected one `value` per cell, "
                    f"got {cell!r}"
                )
            out.append(found[0].strip())
        return out

    def row(self, first_cell: str) -> dict[str, str]:
        for row in self.rows:
            if next(iter(row.values())) == first_cell:
                return row
        raise AssertionError(f"table {self.name}: no row {first_cell!r}")


def _split(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def parse_tables(text: str) -> dict[str, Table]:
    """Every marked table: the marker on a line of its own, then the Markdown table (blank lines
    between them are allowed)."""
    lines = text.splitlines()
    tables: dict[str, Table] = {}
    for i, line in enumerate(lines):
        match = _MARKER.fullmatch(line.strip())
        if match is None:
            continue
        name = match.group(1)
        if name in tables:
            raise AssertionError(f"table {name} is marked twice in {DOC.name}")
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        block = []
        while j < len(lines) and lines[j].lstrip().startswith("|"):
            block.append(lines[j])
            j += 1
        if len(block) < 3 or not set(block[1].replace("|", "").strip()) <= set("-: "):
            raise AssertionError(f"table {name}: no Markdown table (header, separator, rows)")
        header = _split(block[0])
        rows = []
        for raw in block[2:]:
            cells = _split(raw)
            if len(cells) != len(header):
                raise AssertionError(f"table {name}: row {raw!r} has {len(cells)} cells")
            rows.append(dict(zip(header, cells, strict=True)))
        tables[name] = Table(name, tuple(rows))
    return tables


@pytest.fixture(scope="module")
def doc() -> dict[str, Table]:
    tables = parse_tables(DOC.read_text(encoding="utf-8"))
    missing = [name for name in TABLES if name not in tables]
    assert not missing, f"{DOC.name} lacks the marked tables {missing}"
    return tables


def _label(uid: str) -> str:
    name = UID(uid).name
    return uid if name == uid else f"{uid} ({name})"


def assert_same(documented: Iterable[str], actual: Iterable[str], *, table: str, what: str) -> None:
    """Equal as sets, or a message naming each UID missing on either side."""
    doc_set, actual_set = set(documented), set(actual)
    problems = []
    undocumented = sorted(actual_set - doc_set)
    if undocumented:
        problems.append(
            f"{what} but missing from table {table} of {DOC.name}: "
            + ", ".join(map(_label, undocumented))
        )
    absent = sorted(doc_set - actual_set)
    if absent:
        problems.append(
            f"listed in table {table} of {DOC.name} but not what the code does ({what}): "
            + ", ".join(map(_label, absent))
        )
    assert not problems, "\n".join(problems)


def assert_same_order(documented: Sequence[str], actual: Sequence[str], *, table: str) -> None:
    assert_same(documented, actual, table=table, what="in the code")
    assert list(documented) == list(actual), (
        f"table {table} of {DOC.name} lists the right UIDs in the wrong order: the code has "
        + ", ".join(map(_label, actual))
    )


# ---- the SCP as configured ---------------------------------------------------------------------


def _supported(mode: OtherStorage) -> dict[str, list[str]]:
    ae = build_ae(ListenerConfig(other_storage=mode))
    return {
        str(cx.abstract_syntax): [str(ts) for ts in cx.transfer_syntax]
        for cx in ae.supported_contexts
    }


def _documented_classes(doc: dict[str, Table], mode: OtherStorage) -> list[str]:
    classes = doc["scp-sop-classes"].values("SOP Class UID")
    if mode is OtherStorage.ACCEPT:
        classes += doc["scp-other-storage-sop-classes"].values("SOP Class UID")
    return classes


@pytest.mark.parametrize("mode", list(OtherStorage))
def test_documented_scp_contexts_are_the_ones_the_listener_is_built_with(
    doc: dict[str, Table], mode: OtherStorage
) -> None:
    supported = _supported(mode)
    assert_same(
        _documented_classes(doc, mode),
        supported,
        table="scp-sop-classes (+ scp-other-storage-sop-classes when accepting)",
        what=f"SOP classes build_ae configures with other_storage = {mode.value!r}",
    )
    storage_ts = doc["scp-storage-transfer-syntaxes"].values("UID")
    for sop_class, syntaxes in supported.items():
        if sop_class == VERIFICATION:
            assert_same_order(
                doc["scp-verification-transfer-syntaxes"].values("UID"),
                syntaxes,
                table="scp-verification-transfer-syntaxes",
            )
        else:
            assert_same_order(storage_ts, syntaxes, table="scp-storage-transfer-syntaxes")


# ---- the SCP on the network --------------------------------------------------------------------


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Any]:
    """Start the real listener (admission, guard, handlers) on a loopback port; yields a
    function mode -> port."""
    started: list[tuple[Any, JobStore]] = []

    def start(mode: OtherStorage) -> int:
        cfg = ListenerConfig(
            bind_address="127.0.0.1", port=0, other_storage=mode, min_free_disk_mb=0
        )
        state = tmp_path / mode.value
        store = JobStore(state / "db.sqlite3")
        server = start_listener(cfg, Spool(state / "spool"), store)
        started.append((server, store))
        return int(server.server_address[1])

    yield start
    for server, store in started:
        server.shutdown()
        store.close()


def _associate(port: int, contexts: list[PresentationContext], **kwargs: Any) -> Association:
    ae = AE(ae_title="PROBE")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    return ae.associate("127.0.0.1", port, ae_title="LTDIFF", contexts=contexts, **kwargs)


def _accepted(port: int, proposals: Sequence[tuple[str, Sequence[str]]]) -> set[tuple[str, str]]:
    """(abstract syntax, accepted transfer syntax) of every proposal the node accepts; the
    proposals go in associations of at most 128 presentation contexts."""
    accepted: set[tuple[str, str]] = set()
    for start in range(0, len(proposals), MAX_CONTEXTS):
        chunk = [build_context(a, list(t)) for a, t in proposals[start : start + MAX_CONTEXTS]]
        assoc = _associate(port, chunk)
        if assoc.is_established:
            accepted |= {
                (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                for cx in assoc.accepted_contexts
            }
            assoc.release()
        else:  # pynetdicom aborts an association of which no context was accepted
            assert not assoc.is_rejected, "the listener rejected the probing association"
    return accepted


def _known_sop_classes() -> set[str]:
    """Every abstract syntax of every pynetdicom service (storage, query/retrieve, worklist...)."""
    known = set()
    for name in dir(pynetdicom.presentation):
        if name.endswith("PresentationContexts"):
            for cx in getattr(pynetdicom.presentation, name):
                known.add(str(cx.abstract_syntax))
    return known


@pytest.mark.parametrize("mode", list(OtherStorage))
def test_listener_negotiates_exactly_the_documented_sop_classes_and_transfer_syntaxes(
    doc: dict[str, Table], listener: Any, mode: OtherStorage
) -> None:
    port = listener(mode)
    documented = _documented_classes(doc, mode)
    storage_ts = doc["scp-storage-transfer-syntaxes"].values("UID")
    verification_ts = doc["scp-verification-transfer-syntaxes"].values("UID")
    any_ts = list(dict.fromkeys(storage_ts + verification_ts))

    # SOP classes: propose every one pynetdicom knows (and the documented ones).
    candidates = sorted(_known_sop_classes() | set(documented))
    accepted = _accepted(port, [(uid, any_ts) for uid in candidates])
    assert_same(
        documented,
        {abstract for abstract, _ in accepted},
        table="scp-sop-classes (+ scp-other-storage-sop-classes when accepting)",
        what=f"SOP classes the listener accepts with other_storage = {mode.value!r}",
    )

    # Transfer syntaxes: each documented class of Table scp-sop-classes (with 'accept', one of
    # the further classes) with each transfer syntax pydicom knows, one per context.
    probed = doc["scp-sop-classes"].values("SOP Class UID")
    if mode is OtherStorage.ACCEPT:
        probed = doc["scp-other-storage-sop-classes"].values("SOP Class UID")[:1]
    all_ts = sorted({str(ts) for ts in AllTransferSyntaxes} | set(any_ts))
    accepted = _accepted(port, [(uid, [ts]) for uid in probed for ts in all_ts])
    for uid in probed:
        table, expected = (
            ("scp-verification-transfer-syntaxes", verification_ts)
            if uid == VERIFICATION
            else ("scp-storage-transfer-syntaxes", storage_ts)
        )
        assert_same(
            expected,
            {ts for abstract, ts in accepted if abstract == uid},
            table=table,
            what=f"transfer syntaxes the listener accepts for {_label(uid)}",
        )

    # Preference: offered all of them, least preferred first, the node picks its first.
    offered = [(uid, list(reversed(all_ts))) for uid in probed]
    chosen = dict(_accepted(port, offered))
    for uid in probed:
        first = verification_ts[0] if uid == VERIFICATION else storage_ts[0]
        assert chosen.get(uid) == first, (
            f"the listener chose {_label(chosen.get(uid, 'nothing'))} for {_label(uid)}; "
            f"{DOC.name} says it prefers {_label(first)} (the first row of its table)"
        )


def test_listener_identifies_itself_and_negotiates_as_documented(
    doc: dict[str, Table], listener: Any
) -> None:
    port = listener(OtherStorage.REJECT)
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = 5
    window.maximum_number_operations_performed = 5
    assoc = _associate(port, [build_context(CTImageStorage)], ext_neg=[window])
    assert assoc.is_established
    try:
        acceptor = assoc.acceptor
        impl = doc["implementation"]
        announced = (
            str(acceptor.implementation_class_uid),
            acceptor.implementation_version_name,
            str(acceptor.maximum_length),
        )
        documented = tuple(
            _row_value(impl, row) for row in (ASSOCIATION_UID, ASSOCIATION_VERSION, MAX_PDU)
        )
        assert announced == documented, (
            f"the listener announces {announced}; table implementation of {DOC.name} says "
            f"{documented}"
        )
        # "Asynchronous nature: not supported": the proposal gets no reply, the window stays 1.
        assert acceptor.asynchronous_operations == (1, 1)
    finally:
        assoc.release()


def _row_value(table: Table, first_cell: str) -> str:
    (value,) = _CODE.findall(table.row(first_cell)["Value"])
    return value


# ---- statuses -----------------------------------------------------------------------------------


def _status_constants() -> dict[str, int]:
    return {
        name: value
        for name, value in vars(statuses).items()
        if name.isupper() and isinstance(value, int)
    }


def _codes(table: Table) -> list[int]:
    return [int(code, 16) for code in table.values("Code")]


def test_documented_scp_statuses_are_the_named_status_constants(doc: dict[str, Table]) -> None:
    constants = _status_constants()
    documented = _codes(doc["scp-statuses"])
    by_code = {value: name for name, value in constants.items()}
    undocumented = sorted(set(by_code) - set(documented))
    assert not undocumented, (
        "dicom_node/statuses.py has statuses missing from table scp-statuses of "
        f"{DOC.name}: " + ", ".join(f"0x{c:04X} ({by_code[c]})" for c in undocumented)
    )
    unknown = sorted(set(documented) - set(by_code))
    assert not unknown, (
        f"table scp-statuses of {DOC.name} lists codes with no constant in "
        "dicom_node/statuses.py: " + ", ".join(f"0x{c:04X}" for c in unknown)
    )


def test_documented_stored_statuses_are_the_ones_the_export_counts_as_stored(
    doc: dict[str, Table],
) -> None:
    documented = {f"0x{c:04X}" for c in _codes(doc["scu-stored-statuses"])}
    assert_same(
        documented,
        {f"0x{c:04X}" for c in export._STORED},
        table="scu-stored-statuses",
        what="statuses dicom_node/export.py counts as stored",
    )


# ---- the derived series and the export SCU -----------------------------------------------------

IDENTITY = EngineIdentity(
    name="linear-filter",
    version="0.1.0",
    weights_sha256="0123456789abcdef" * 4,
    source_kernel="Br40d",
    target_kernel="Bl64d",
)


@pytest.fixture
def derived(tmp_path: Path) -> tuple[list[Dataset], list[Path], Dataset]:
    """(derived datasets, their files, one source dataset) for a small synthetic series."""
    sources = []
    for i, ds in enumerate(make_ct_series(3, 16, 16)):
        path = tmp_path / "source" / f"{i}.dcm"
        path.parent.mkdir(exist_ok=True)
        dcmwrite(path, ds, enforce_file_format=True)
        sources.append(path)
    loaded = load_series(sources)
    series = build_derived_series(
        loaded, loaded.volume_hu.copy(), IDENTITY, now=datetime(2024, 5, 6, 7, 8, 9)
    )
    out = tmp_path / "derived"
    out.mkdir()
    paths = []
    for ds in series.datasets:
        path = out / f"{ds.SOPInstanceUID}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return series.datasets, paths, loaded.datasets[0]


def test_derived_instances_carry_the_documented_attributes(
    doc: dict[str, Table], derived: tuple[list[Dataset], list[Path], Dataset]
) -> None:
    datasets, _, source = derived
    table = doc["derived-attributes"]
    for row in table.rows:
        keywords = _CODE.findall(row["Keyword"])
        tags = [Tag(int(g, 16), int(e, 16)) for g, e in _TAG.findall(row["Tag"])]
        assert keywords and len(keywords) == len(tags), f"table derived-attributes: row {row}"
        for keyword, tag in zip(keywords, tags, strict=True):
            assert tag_for_keyword(keyword) == tag, (
                f"table derived-attributes of {DOC.name}: {keyword} is "
                f"{Tag(tag_for_keyword(keyword) or 0)}, not {tag}"
            )
            if row["Presence"] == "Always":
                missing = [ds.SOPInstanceUID for ds in datasets if keyword not in ds]
                assert not missing, f"{keyword} is documented 'Always' but missing in {missing}"
        assert row["Presence"] == "Always" or row["Presence"].startswith("Conditional"), row
    ct_image = doc["scu-derived-sop-classes"].values("SOP Class UID")
    assert {str(ds.SOPClassUID) for ds in datasets} == set(ct_image)
    assert all(list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"] for ds in datasets)
    # Section 6: Specific Character Set is copied from the source.
    assert "SpecificCharacterSet" in source
    assert all(ds.SpecificCharacterSet == source.SpecificCharacterSet for ds in datasets)
    impl = doc["implementation"]
    for ds in datasets:
        assert str(ds.file_meta.ImplementationClassUID) == _row_value(impl, FILE_META_UID)
        assert ds.file_meta.ImplementationVersionName == _row_value(impl, FILE_META_VERSION)
    assert _row_value(impl, FILE_META_UID) == IMPLEMENTATION_CLASS_UID
    assert _row_value(impl, FILE_META_VERSION) == IMPLEMENTATION_VERSION_NAME


class CapturingSCP:
    """A storage and verification SCP that records what each association proposed and how the
    requestor identified itself."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.proposals: list[list[tuple[str, list[str]]]] = []
        self.requestors: list[tuple[str, str | None, int]] = []
        ae = AE(ae_title="CAPTURE")
        ae.add_supported_context(Verification)
        ae.add_supported_context(CTImageStorage, [str(ts) for ts in AllTransferSyntaxes])
        self.server: Any = ae.start_server(
            ("127.0.0.1", 0),
            block=False,
            evt_handlers=[
                (evt.EVT_ACCEPTED, self._on_accepted),
                (evt.EVT_C_STORE, lambda _event: statuses.SUCCESS),
            ],
        )
        self.port = int(self.server.server_address[1])

    def _on_accepted(self, event: evt.Event) -> None:
        requestor = event.assoc.requestor
        with self.lock:
            self.proposals.append(
                [
                    (str(cx.abstract_syntax), [str(ts) for ts in cx.transfer_syntax])
                    for cx in requestor.requested_contexts
                ]
            )
            self.requestors.append(
                (
                    str(requestor.implementation_class_uid),
                    requestor.implementation_version_name,
                    int(requestor.maximum_length),
                )
            )

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def capture() -> Iterator[CapturingSCP]:
    scp = CapturingSCP()
    yield scp
    scp.stop()


def test_export_scu_proposes_the_documented_contexts_and_identifies_itself(
    doc: dict[str, Table],
    capture: CapturingSCP,
    derived: tuple[list[Dataset], list[Path], Dataset],
) -> None:
    _, paths, _ = derived
    dest = DestinationConfig(
        name="capture", ae_title="CAPTURE", host="127.0.0.1", port=capture.port
    )
    result = export.send_paths(dest, "LTDIFF", paths)
    assert len(result.sent) == len(paths), result.failed
    ok, what = export.echo(dest, "LTDIFF")
    assert ok, what

    store_proposal, echo_proposal = capture.proposals
    assert_same(
        doc["scu-derived-sop-classes"].values("SOP Class UID"),
        [abstract for abstract, _ in store_proposal],
        table="scu-derived-sop-classes",
        what="SOP classes the export proposes for a derived series",
    )
    for _, syntaxes in store_proposal:
        assert_same_order(
            doc["scu-derived-transfer-syntaxes"].values("UID"),
            syntaxes,
            table="scu-derived-transfer-syntaxes",
        )
    assert [abstract for abstract, _ in echo_proposal] == [VERIFICATION]
    assert_same_order(
        doc["scu-verification-transfer-syntaxes"].values("UID"),
        echo_proposal[0][1],
        table="scu-verification-transfer-syntaxes",
    )
    impl = doc["implementation"]
    documented = (
        _row_value(impl, ASSOCIATION_UID),
        _row_value(impl, ASSOCIATION_VERSION),
        int(_row_value(impl, MAX_PDU)),
    )
    for requestor in capture.requestors:
        assert requestor == documented, (
            f"the export SCU identifies itself as {requestor}; table implementation of "
            f"{DOC.name} says {documented}"
        )


def test_the_parser_finds_uids_and_refuses_malformed_tables() -> None:
    text = (
        "intro `<!-- conformance-table: not-a-marker -->`\n"
        "<!-- conformance-table: t -->\n\n"
        "| Name | UID |\n| --- | --- |\n| CT | `1.2.840.10008.5.1.4.1.1.2` |\n\nafter\n"
    )
    tables = parse_tables(text)
    assert list(tables) == ["t"]
    assert tables["t"].values("UID") == ["1.2.840.10008.5.1.4.1.1.2"]
    with pytest.raises(AssertionError, match="no Markdown table"):
        parse_tables("<!-- conformance-table: empty -->\nno table\n")
    with pytest.raises(AssertionError, match="missing from table x"):
        assert_same(["1.2.840.10008.1.1"], ["1.2.840.10008.1.1", "1.2.3"], table="x", what="w")
