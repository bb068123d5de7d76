"""Receiver processes, the pure parts: which receiver gets a connection, and the records the
receivers and the main process exchange (dicom_node/receiver_protocol.py)."""

import pickle

import pytest

from dicom_node.audit.reception import Subject
from dicom_node.metrics import RejectionReason
from dicom_node.receiver_protocol import (
    MAX_MESSAGE_BYTES,
    Admitted,
    Call,
    Closed,
    HandOver,
    Log,
    Ready,
    Stop,
    choose_receiver,
    decode,
    encode,
    encode_log,
)


def test_the_least_busy_receiver_gets_the_connection():
    assert choose_receiver([3, 1, 2]) == 1
    assert choose_receiver([0, 0, 5], start=1) == 1


def test_ties_go_round_robin_from_the_start_index():
    loads = [1, 1, 1, 1]
    assert [choose_receiver(loads, start) for start in range(4)] == [0, 1, 2, 3]
    assert choose_receiver(loads, start=5) == 1


def test_a_receiver_that_is_not_running_gets_nothing():
    assert choose_receiver([None, 4, None]) == 1
    assert choose_receiver([None, None]) is None
    assert choose_receiver([]) is None


def test_four_connections_on_two_idle_receivers_are_split_two_and_two():
    loads: list[int | None] = [0, 0]
    start = 0
    for _ in range(4):
        i = choose_receiver(loads, start)
        assert i is not None
        loads[i] = (loads[i] or 0) + 1
        start = (i + 1) % len(loads)
    assert loads == [2, 2]


@pytest.mark.parametrize(
    "message",
    [
        HandOver(7, ("127.0.0.1", 40000)),
        Stop(),
        Ready(1234),
        Admitted(7, ok=False),
        Closed(7),
        Call("metrics", "instance_received", (0,), {"duplicate": True}),
        Call("metrics", "association_rejected", (RejectionReason.TLS_FAILED,)),
        Call(
            "audit",
            "instance_receiving",
            ("1.2", "PACS", "10.0.0.1", Subject("p", "n", "1.3"), "1.4"),
        ),
        Log("dicom_node.scp", 30, "instance.rejected", {"reason": "x", "status": "0xA700"}),
    ],
)
def test_every_record_survives_encoding(message):
    assert decode(encode(message)) == message


def test_decoding_refuses_what_is_not_a_receiver_record():
    with pytest.raises(TypeError, match="not a receiver message"):
        decode(pickle.dumps({"event": "x"}))


def test_a_log_field_that_cannot_be_pickled_is_sent_as_text():
    unpicklable = lambda: None  # noqa: E731 - a value pickle refuses
    message = decode(encode_log("dicom_node.scp", 20, "e", {"n": 3, "f": unpicklable}))
    assert isinstance(message, Log)
    assert message.fields["n"] == 3
    assert message.fields["f"].startswith("<function")


def test_a_log_line_too_long_for_one_message_loses_its_longest_fields_and_says_so():
    data = encode_log("dicom_node.x", 40, "thread.uncaught_exception", {"exception": "t" * 10**6})
    assert len(data) <= MAX_MESSAGE_BYTES
    message = decode(data)
    assert isinstance(message, Log)
    assert message.fields["truncated"] == ["exception"]
    assert message.event == "thread.uncaught_exception"
