"""A seeded, bounded fuzz run against the node as hospital IT runs it (`ltdiff-node serve` in its
own process): 330 mutated and hostile datasets and requests, sent byte for byte.

What must hold, whatever arrives:
- every request gets a documented status (or, for a request the node cannot answer, a clean
  A-ABORT), never a timeout and never 0xA700 (which would mean an internal error here: the disk
  is not full);
- the node keeps serving: a C-ECHO every 30 cases, and the process never dies;
- its memory (the node, the fork server and the engine process together) stays bounded;
- it writes nothing outside its state folder (its working directory, TMPDIR and HOME stay empty);
- nothing it writes carries the PHI the datasets carry;
- it stops cleanly on SIGTERM afterwards.

The cases are a pure function of the seed, so a failure reproduces with the same seed.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import struct
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from dicom_bytes import (
    deflate,
    deflate_bomb,
    encode,
    nested_sequence,
    replace_value,
    top_level_elements,
)
from hostile_scu import VERIFICATION, AssociationUnusableError, HostileSCU
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom.sop_class import CTImageStorage, MRImageStorage  # type: ignore[attr-defined]
from tests_support import free_port, serve, wait_until, write_site_config

from dicom_node import statuses
from engine.synthetic import make_ct_series

pytestmark = pytest.mark.slow

SEED = 20261201
PHI = {
    "PatientName": "ZQFUZZ^PHINAME^XQ",
    "PatientID": "PHIID-7Q4711",
    "PatientBirthDate": "19230405",
    "OtherPatientIDs": "PHIOTHER-88Z",
    "AccessionNumber": "PHIACC-5521",
}
#: What the node may answer (docs/OPERATIONS.md, Guarantees). 0xA700 is documented too, but
#: only for a full disk or an unwritable spool, which this run does not have.
DOCUMENTED = {
    statuses.SUCCESS,
    statuses.SOP_CLASS_NOT_SUPPORTED,
    statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS,
    statuses.CANNOT_UNDERSTAND,
    statuses.CANNOT_UNDERSTAND_INVALID_UID,
    statuses.CANNOT_UNDERSTAND_UID_MISMATCH,
    statuses.CANNOT_UNDERSTAND_INVALID_REQUEST_UID,
    statuses.CANNOT_UNDERSTAND_LIMIT_EXCEEDED,
}
MEMORY_BOUND = 1024 << 20  # measured peak: about 400 MB; one uncapped bomb exceeds it
CONTEXTS = [
    (CTImageStorage, [ExplicitVRLittleEndian]),
    (CTImageStorage, [ImplicitVRLittleEndian]),
    (CTImageStorage, [ExplicitVRBigEndian]),
    (CTImageStorage, [DeflatedExplicitVRLittleEndian]),
    (MRImageStorage, [ExplicitVRLittleEndian]),  # not accepted: the node stores CT only
    (VERIFICATION, [ImplicitVRLittleEndian]),
]


@dataclass(frozen=True)
class Case:
    family: str
    data: bytes
    sop_class: str | bytes
    sop_instance: str | bytes
    syntax: str = ExplicitVRLittleEndian
    context_class: str = CTImageStorage
    request_level: bool = False  # the command set itself is hostile: an abort is an answer


def _base(family: str, index: int) -> Dataset:
    (ds,) = make_ct_series(1, 32, 32, "Br40d", uid_seed=f"fuzz-{family}")
    ds.SOPInstanceUID = f"{ds.SeriesInstanceUID}.{index + 1}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in PHI.items():
        setattr(ds, keyword, value)
    return ds


def _case(family: str, ds: Dataset, data: bytes, **kw: object) -> Case:
    return Case(family, data, CTImageStorage, str(ds.SOPInstanceUID), **kw)  # type: ignore[arg-type]


def _byte_flips(rng: random.Random, ds: Dataset) -> Case:
    data = bytearray(encode(ds))
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return _case("byte-flip", ds, bytes(data))


def _truncation(rng: random.Random, ds: Dataset) -> Case:
    data = encode(ds)
    return _case("truncation", ds, data[: rng.randrange(1, len(data))])


def _length_patch(rng: random.Random, ds: Dataset) -> Case:
    data = bytearray(encode(ds))
    offset, _tag, header = rng.choice(top_level_elements(bytes(data)))
    length = rng.choice([0, 1, 3, 720, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, rng.randrange(1 << 16)])
    if header == 12:
        struct.pack_into("<L", data, offset + 8, length)
    else:
        struct.pack_into("<H", data, offset + 6, length & 0xFFFF)
    return _case("length-patch", ds, bytes(data))


def _vr_patch(rng: random.Random, ds: Dataset) -> Case:
    data = bytearray(encode(ds))
    offset, _tag, _header = rng.choice(top_level_elements(bytes(data)))
    vr = rng.choice(
        [b"CO", b"ZZ", b"SQ", b"UN", b"OB", b"UI", b"PN", b"DA", b"\x00\x00", b"\xff\xfe"]
    )
    data[offset + 4 : offset + 6] = vr
    return _case("vr-patch", ds, bytes(data))


def _nesting(rng: random.Random, ds: Dataset) -> Case:
    data = encode(ds)
    at = next(off for off, tag, _ in top_level_elements(data) if tag >> 16 >= 0x0020)
    depth = rng.choice([rng.randint(1, 16), rng.randint(17, 600)])
    return _case("nesting", ds, data[:at] + nested_sequence(depth) + data[at:])


def _element_bomb(rng: random.Random, ds: Dataset) -> Case:
    data = encode(ds)
    at = next(off for off, tag, _ in top_level_elements(data) if tag >> 16 >= 0x0020)
    count = rng.randint(210_000, 260_000)
    private = struct.pack("<HH2sH", 0x0019, 0x1001, b"SH", 0)
    return _case("element-bomb", ds, data[:at] + private * count + data[at:])


def _deflate_bomb(rng: random.Random, ds: Dataset) -> Case:
    return _case(
        "deflate-bomb",
        ds,
        deflate_bomb(encode(ds), rng.randint(600, 3200)),
        syntax=DeflatedExplicitVRLittleEndian,
    )


def _broken_deflate(rng: random.Random, ds: Dataset) -> Case:
    data = bytearray(deflate(encode(ds)))
    for _ in range(rng.randint(1, 6)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return _case("broken-deflate", ds, bytes(data), syntax=DeflatedExplicitVRLittleEndian)


def _junk(rng: random.Random, ds: Dataset) -> Case:
    return _case("junk", ds, rng.randbytes(rng.randint(0, 4096)))


def _swap(rng: random.Random, ds: Dataset) -> Case:
    data = encode(ds)
    elements = top_level_elements(data)
    bounds = [
        (off, elements[i + 1][0] if i + 1 < len(elements) else len(data))
        for i, (off, _, _) in enumerate(elements)
    ]
    (a0, a1), (b0, b1) = sorted(rng.sample(bounds, 2))
    return _case("swap", ds, data[:a0] + data[b0:b1] + data[a1:b0] + data[a0:a1] + data[b1:])


def _dataset_uids(rng: random.Random, ds: Dataset) -> Case:
    keyword = rng.choice(["SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "SOPClassUID"])
    request_instance = str(ds.SOPInstanceUID)
    value = rng.choice(["", "1." + "2" * 70, "1.02.3", "abc", PHI["PatientID"], "1.2.3"])
    setattr(ds, keyword, value)
    return Case("dataset-uid", encode(ds), CTImageStorage, request_instance)


def _request(rng: random.Random, ds: Dataset) -> Case:
    instance: str | bytes = rng.choice(
        ["", " ", "1." + "9" * 70, "junk^" + PHI["PatientID"], "1.2.3", str(ds.SOPInstanceUID)]
    )
    sop_class: str | bytes = rng.choice(["", CTImageStorage, MRImageStorage, "1.2", "x" * 80])
    return Case("request", encode(ds), sop_class, instance, request_level=True)


def _valid_encodings(rng: random.Random, ds: Dataset) -> Case:
    syntax = rng.choice(
        [
            ExplicitVRLittleEndian,
            ImplicitVRLittleEndian,
            ExplicitVRBigEndian,
            DeflatedExplicitVRLittleEndian,
        ]
    )
    if syntax == DeflatedExplicitVRLittleEndian:
        data = deflate(encode(ds))
    else:
        data = encode(
            ds, implicit=syntax == ImplicitVRLittleEndian, little=syntax != ExplicitVRBigEndian
        )
    return _case("valid", ds, data, syntax=syntax)


def _short_pixels(rng: random.Random, ds: Dataset) -> Case:
    ds.PixelData = ds.PixelData[: rng.randrange(0, len(ds.PixelData), 2)]
    return _case("short-pixels", ds, encode(ds))


#: Attributes the engine and the derived series read (tag, keyword), for _odd_values.
_READ_BY_THE_ENGINE = [
    (0x00200013, "InstanceNumber"),
    (0x00281052, "RescaleIntercept"),
    (0x00280030, "PixelSpacing"),
    (0x00200032, "ImagePositionPatient"),
    (0x00180050, "SliceThickness"),
    (0x00181210, "ConvolutionKernel"),
]


def _odd_values(rng: random.Random, ds: Dataset) -> Case:
    data = encode(ds)
    present = {tag for _, tag, _ in top_level_elements(data)}
    for tag, keyword in rng.sample([t for t in _READ_BY_THE_ENGINE if t[0] in present], 2):
        odd = [b"", b"abc", b"1e309", b"-0", b"1\\2\\3\\4"]
        if keyword != "ConvolutionKernel":
            # The kernel name is logged by design (series.routed, series.done: docs/OPERATIONS.md,
            # Logs); it is equipment metadata, not a place the node must search for PHI.
            odd.append(PHI["PatientID"].encode())
        value = rng.choice(odd)
        data = replace_value(data, tag, value)
    return _case("odd-values", ds, data)


FAMILIES: list[tuple[Callable[[random.Random, Dataset], Case], int]] = [
    (_byte_flips, 40),
    (_truncation, 25),
    (_length_patch, 40),
    (_vr_patch, 30),
    (_nesting, 20),
    (_element_bomb, 3),
    (_deflate_bomb, 6),
    (_broken_deflate, 15),
    (_junk, 20),
    (_swap, 20),
    (_dataset_uids, 25),
    (_request, 30),
    (_valid_encodings, 20),
    (_short_pixels, 16),
    (_odd_values, 20),
]


def make_cases(seed: int) -> list[Case]:
    rng = random.Random(seed)
    cases = []
    pydicom_log = logging.getLogger("pydicom")
    level = pydicom_log.level
    pydicom_log.setLevel(logging.ERROR)  # the generator sets invalid values on purpose
    try:
        for family, count in FAMILIES:
            for i in range(count):
                name = family.__name__.lstrip("_")
                cases.append(family(rng, _base(name, i)))
    finally:
        pydicom_log.setLevel(level)
    rng.shuffle(cases)
    return cases


def _process_tree_rss(root: int) -> int:
    """Resident bytes of `root` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


class _MemoryWatch(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.1):
            self.peak = max(self.peak, _process_tree_rss(self.pid))


def _send(port: int, case: Case) -> tuple[int | None, str]:
    with HostileSCU(
        "127.0.0.1", port, called_ae="LTDIFF", calling_ae="FUZZER", contexts=CONTEXTS, timeout=30
    ) as scu:
        if not scu.associated:
            return None, "not associated"
        try:
            status = scu.c_store(
                case.data,
                sop_class=case.sop_class,
                sop_instance=case.sop_instance,
                transfer_syntax=case.syntax,
                context_class=case.context_class,
            )
        except AssociationUnusableError:
            return None, scu.outcome
        return status, scu.outcome


def _echo(port: int) -> int | None:
    with HostileSCU(
        "127.0.0.1", port, called_ae="LTDIFF", calling_ae="FUZZER", contexts=CONTEXTS, timeout=30
    ) as scu:
        return scu.c_echo()


def test_cases_are_a_pure_function_of_the_seed():
    a, b = make_cases(SEED), make_cases(SEED)
    assert [c.data for c in a] == [c.data for c in b]
    assert len(a) >= 300


def test_the_node_survives_330_hostile_datasets(tmp_path):
    cases = make_cases(SEED)
    port = free_port()
    cwd, tmpdir, home, etc = (tmp_path / n for n in ("cwd", "tmp", "home", "etc"))
    for d in (cwd, tmpdir, home, etc):
        d.mkdir()
    config = write_site_config(
        etc / "site.toml",
        tmp_path / "state",
        port,
        "[listener.limits]\nmax_dataset_mb = 64",
        poll_interval_s=0.1,
    )
    out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
    env = {**os.environ, "TMPDIR": str(tmpdir), "HOME": str(home)}
    proc = serve(config, out, stderr=err, env=env, cwd=cwd)
    watch = _MemoryWatch(proc.pid)
    try:
        watch.start()
        answers: Counter[str] = Counter()
        for i, case in enumerate(cases):
            status, outcome = _send(port, case)
            label = f"case {i} ({case.family})"
            if status is None:
                assert case.request_level and outcome == "aborted", f"{label}: {outcome}"
            else:
                assert status in DOCUMENTED, f"{label}: undocumented status 0x{status:04X}"
            answers[f"{case.family}:{'abort' if status is None else hex(status)}"] += 1
            if i % 30 == 29:
                assert proc.poll() is None, f"the node died after {label}"
                assert _echo(port) == statuses.SUCCESS, f"C-ECHO after {label}"
        assert any(k.startswith("valid:0x0") for k in answers), answers

        def settled() -> bool:
            status_out = subprocess.run(
                [sys.executable, "-m", "dicom_node.cli", "status", "--json", "-c", str(config)],
                capture_output=True,
                text=True,
                check=True,
                env=env,
                cwd=cwd,
            ).stdout
            import json

            report = json.loads(status_out)
            return not report["series"].get("receiving") and not (
                report["jobs"].get("queued") or report["jobs"].get("processing")
            )

        wait_until(settled, 120, "every accepted series processed")
        assert _echo(port) == statuses.SUCCESS
        watch.stop.set()
        assert watch.peak < MEMORY_BOUND, f"peak memory {watch.peak >> 20} MB"
    finally:
        watch.stop.set()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, f"SIGTERM stops the node cleanly: {err.read_text()[-3000:]}"
    for folder in (cwd, tmpdir, home):
        assert list(folder.iterdir()) == [], f"the node wrote outside its state folder: {folder}"
    written = out.read_bytes() + err.read_bytes()
    for keyword, value in PHI.items():
        assert value.encode() not in written, f"{keyword} appears in what the node wrote"
    print(f"peak memory {watch.peak >> 20} MB; answers: {dict(sorted(answers.items()))}")
