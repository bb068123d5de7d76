"""Logs: JSON lines with stable event names, stdlib loggers through the same pipeline, no PHI."""

import json
import logging
import sys
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import pydicom.config
import pydicom.valuerep
import pytest
from pydicom.dataelem import DataElement
from pynetdicom import _config as pynetdicom_config

from dicom_node.logs import (
    configure_logging,
    configure_process,
    get_logger,
    redact,
    safe_error_text,
)


def _lines(capsys):
    return [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.strip()]


def test_json_lines_with_event_and_fields(capsys):
    configure_logging("json", "info")
    get_logger("test.json").info("series.done", slices=300, status="done")
    (line,) = _lines(capsys)
    assert line["event"] == "series.done" and line["slices"] == 300 and line["level"] == "info"
    assert "timestamp" in line


def test_stdlib_logs_go_through_the_same_pipeline(capsys):
    configure_logging("json", "info")
    logging.getLogger("pynetdicom").warning("peer aborted")
    (line,) = _lines(capsys)
    assert line["event"] == "peer aborted" and line["logger"] == "pynetdicom"


def test_patient_attributes_never_reach_the_log(capsys):
    configure_logging("json", "info")
    get_logger("test.phi").info(
        "oops", patient_name="DOE^JANE", PatientID="PID-ZQX", birth_date="19700101"
    )
    (line,) = _lines(capsys)
    text = json.dumps(line)
    # Markers that a timestamp cannot contain (a PatientID of digits could match the clock).
    assert "DOE" not in text and "PID-ZQX" not in text and "19700101" not in text
    configure_logging("console", "warning")


# ---- third-party text, exceptions and process hooks: no PHI (issue 8) ----------------------

NAME, PID, DOB = "ZQXFAMILY^ZQXGIVEN", "ZQXPID4711", "18770911"


def _no_phi(text: str) -> bool:
    return not any(s in text for s in ("ZQX", DOB))


@pytest.fixture
def hooks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Everything configure_process changes globally, restored after the test. The hooks
    themselves are installed by the tests, in their body: pytest swaps its own thread and
    unraisable hooks in and out around each test phase."""
    for obj, name in (
        (sys, "excepthook"),
        (threading, "excepthook"),
        (sys, "unraisablehook"),
        (pydicom.config.settings, "_reading_validation_mode"),
        (pynetdicom_config, "LOG_REQUEST_IDENTIFIERS"),
        (pynetdicom_config, "LOG_RESPONSE_IDENTIFIERS"),
    ):
        monkeypatch.setattr(obj, name, getattr(obj, name))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        # An in-process `serve` of an earlier test may have left logging's capture switched on
        # while pytest restored warnings.showwarning: then captureWarnings(True) does nothing.
        logging.captureWarnings(False)
        try:
            yield
        finally:
            logging.captureWarnings(False)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            f"Invalid value for VR UI: '1.2.840\\x00{NAME}\\x00{PID}'. Please see <https://x>.",
            "Invalid value for VR UI: '[redacted]'. Please see <https://x>.",
        ),
        (f'Value "{DOB}" is not valid for DS', 'Value "[redacted]" is not valid for DS'),
        (
            f"bytes b'\\x10\\x00{PID}' and bytearray(b\"{DOB}\")",
            "bytes b'[redacted]' and bytearray(b\"[redacted]\")",
        ),
        (f"person {NAME} here", "person [redacted] here"),
        (f"can't read '{PID}'", "can't read '[redacted]'"),
        (f"unclosed '{PID} until the end\nnext line", "unclosed '[redacted]'\nnext line"),
        (f"raw \x00{PID}\x01 bytes", "raw [redacted] bytes"),
        (
            "Non-conformant 'Affected SOP Instance UID' value '1.2.3.4'",
            "Non-conformant 'Affected SOP Instance UID' value '[redacted]'",
        ),
        (
            "no decoder for '1.2.840.10008.1.2.4.50' in (0008,0016) '(7FE0,0010)' 'PixelData' "
            "VR 'OW'",
            "no decoder for '1.2.840.10008.1.2.4.50' in (0008,0016) '(7FE0,0010)' 'PixelData' "
            "VR 'OW'",
        ),
    ],
)
def test_redact_replaces_quoted_values_and_person_names_and_keeps_dicom_vocabulary(
    text: str, expected: str
) -> None:
    assert redact(text) == expected
    assert redact(expected) == expected, "idempotent"


def test_safe_error_text_keeps_the_type_and_redacts_the_message() -> None:
    with pytest.raises(ValueError, match="invalid literal") as info:
        int(PID)
    assert (
        safe_error_text(info.value)
        == "ValueError: invalid literal for int() with base 10: '[redacted]'"
    )
    assert safe_error_text(RuntimeError()) == "RuntimeError"


def test_pydicom_warning_quoting_a_value_reaches_the_log_redacted(capsys, hooks) -> None:
    configure_process("json", "info")
    pydicom.valuerep.validate_value("PN", f"{NAME}=A=B=C", pydicom.config.WARN)
    pydicom.valuerep.validate_value("DA", f"{DOB}-X", pydicom.config.WARN)
    out, err = capsys.readouterr()
    lines = [json.loads(x) for x in out.splitlines()]
    assert {line["logger"] for line in lines} == {"pydicom", "py.warnings"}, (
        "pydicom's log records and its Python warnings both go through the pipeline"
    )
    assert all("[redacted]" in line["event"] for line in lines if "VR DA" in line["event"])
    assert _no_phi(out + err), out + err


def test_pydicom_does_not_validate_values_while_reading_in_the_node(capsys, hooks) -> None:
    configure_process("json", "info")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        DataElement(0x00100030, "DA", f"{DOB}-X")  # as pydicom builds it while reading
        DataElement(0x00080016, "UI", f"1.2.{PID}")
    assert not caught and not capsys.readouterr().out, "no value-quoting chatter at source"


def test_traceback_keeps_frames_and_types_but_not_values(capsys) -> None:
    configure_logging("json", "info")

    def decode_value() -> None:
        raise ValueError(f"cannot decode {PID.encode()!r} of {NAME}")

    try:
        try:
            decode_value()
        except ValueError as exc:
            raise KeyError(DOB) from exc
    except KeyError:
        get_logger("test.tb").exception("job.failed", series_uid="1.2.3.4")
    out = capsys.readouterr().out
    (line,) = _lines_of(out)
    tb = line["exception"]
    assert "decode_value" in tb and "ValueError: cannot decode b'[redacted]' of [redacted]" in tb
    assert "direct cause" in tb and "KeyError: '[redacted]'" in tb
    assert line["series_uid"] == "1.2.3.4"
    assert _no_phi(out), out


def test_stdlib_record_with_exception_is_redacted(capsys) -> None:
    configure_logging("json", "info")
    try:
        raise ValueError(f"Invalid 'Patient ID' value '{PID}'")
    except ValueError as exc:
        logging.getLogger("pynetdicom.dsutils").exception(exc)  # noqa: TRY401 - as pynetdicom does
    out = capsys.readouterr().out
    (line,) = _lines_of(out)
    assert line["event"] == "Invalid 'Patient ID' value '[redacted]'"
    assert "ValueError: Invalid 'Patient ID' value '[redacted]'" in line["exception"]
    assert _no_phi(out), out


def test_our_structured_fields_survive_and_the_error_field_is_redacted(capsys) -> None:
    configure_logging("json", "info")
    get_logger("test.fields").info(
        "series.failed",
        series_uid="1.2.826.0.1.3680043.2.1",
        calling_ae="MODALITY",
        slices=3,
        error=f"ValueError: could not convert string to float: '{PID}'",
    )
    (line,) = _lines_of(capsys.readouterr().out)
    assert line["series_uid"] == "1.2.826.0.1.3680043.2.1" and line["calling_ae"] == "MODALITY"
    assert line["error"] == "ValueError: could not convert string to float: '[redacted]'"


def test_uncaught_exception_in_a_thread_is_logged_without_values(capsys, hooks) -> None:
    configure_process("json", "info")

    def association_thread() -> None:
        raise UnicodeDecodeError("ascii", f"{NAME}".encode(), 0, 1, f"bad {PID!r}")

    t = threading.Thread(target=association_thread, name="AcceptorThread-1")
    t.start()
    t.join()
    out, err = capsys.readouterr()
    (line,) = _lines_of(out)
    assert line["event"] == "thread.uncaught_exception" and line["thread"] == "AcceptorThread-1"
    assert "association_thread" in line["exception"] and "UnicodeDecodeError" in line["exception"]
    assert not err and _no_phi(out), out + err


def test_uncaught_exception_in_the_main_thread_is_logged_without_values(capsys, hooks) -> None:
    configure_process("json", "info")
    try:
        raise OSError(f"cannot open '{NAME}.dcm'")
    except OSError:
        sys.excepthook(*sys.exc_info())
    out, err = capsys.readouterr()
    (line,) = _lines_of(out)
    assert line["event"] == "process.uncaught_exception" and "OSError" in line["exception"]
    assert not err and _no_phi(out), out + err


def test_record_that_cannot_be_formatted_is_reported_without_its_message(capsys) -> None:
    configure_logging("json", "info")
    logging.getLogger("pydicom").warning("value %d of %s", PID, NAME)  # bad format arguments
    out, err = capsys.readouterr()
    assert "'pydicom' dropped" in err and "TypeError" in err
    assert _no_phi(out + err), out + err


def _lines_of(out: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in out.splitlines() if x.strip()]
