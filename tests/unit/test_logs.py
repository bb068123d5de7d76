"""Logs: JSON lines with stable event names, stdlib loggers through the same pipeline, no PHI."""

import json
import logging

from dicom_node.logs import configure_logging, get_logger


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
        "oops", patient_name="DOE^JANE", PatientID="123", birth_date="19700101"
    )
    (line,) = _lines(capsys)
    text = json.dumps(line)
    assert "DOE" not in text and "123" not in text and "1970" not in text
    configure_logging("console", "warning")
