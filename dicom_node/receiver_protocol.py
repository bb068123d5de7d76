"""What the main process and its receiver processes tell each other, and how the main process
picks a receiver: pure logic, no sockets (dicom_node/receivers.py does the I/O).

Each receiver process has one Unix SOCK_SEQPACKET socket pair to the main process (message
boundaries kept, file descriptors passed alongside):

- main -> receiver: `HandOver` (an admitted TCP connection; its descriptor travels with the
  message) and `Stop`;
- receiver -> main: `Ready` once it serves, `Admitted` when a connection has passed (or failed)
  the TLS handshake and first-PDU wait, `Closed` when it is over, `Call` for what the association
  threads tell the node's metrics and audit trail, and `Log` for every log line (the main process
  writes them, so the node has one log stream).

Messages are pickled: both ends are the same program, started by the main process, and the socket
pair is never reachable by anything else.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

#: The objects of the main process a receiver's `Call` may address.
CallTarget = Literal["metrics", "audit"]


@dataclass(frozen=True)
class HandOver:
    conn_id: int
    address: tuple[Any, ...]  # the peer's (host, port[, flowinfo, scope_id])


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class Ready:
    pid: int


@dataclass(frozen=True)
class Admitted:
    """Admission of `conn_id` is over: it became an association (`ok`) or was closed."""

    conn_id: int
    ok: bool


@dataclass(frozen=True)
class Closed:
    """`conn_id` is over (its association ended, or admission closed it)."""

    conn_id: int


@dataclass(frozen=True)
class Call:
    """`target.method(*args, **kwargs)` in the main process (a NodeMetrics or AuditTrail call)."""

    target: CallTarget
    method: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Log:
    """One log line of the receiver, already free of PHI (its processors ran there)."""

    logger: str
    level: int
    event: str
    fields: Mapping[str, Any] = field(default_factory=dict)


ToReceiver = HandOver | Stop
FromReceiver = Ready | Admitted | Closed | Call | Log

#: A message larger than this is not sent whole (a log line is cut down instead).
MAX_MESSAGE_BYTES = 64 * 1024


def encode(message: ToReceiver | FromReceiver) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def decode(data: bytes) -> ToReceiver | FromReceiver:
    message = pickle.loads(data)  # noqa: S301 - our own child process, over a private socket pair
    if not isinstance(message, HandOver | Stop | Ready | Admitted | Closed | Call | Log):
        raise TypeError(f"not a receiver message: {type(message).__name__}")
    return message


def encode_log(logger: str, level: int, event: str, fields: Mapping[str, Any]) -> bytes:
    """A `Log` message; a field that cannot be pickled is sent as its str(), and a line too long
    for one message loses its longest fields (named in `truncated`)."""
    safe: dict[str, Any] = {}
    for key, value in fields.items():
        try:
            pickle.dumps(value)
        except Exception:  # noqa: BLE001 - anything unpicklable is logged as text
            safe[key] = str(value)
        else:
            safe[key] = value
    data = encode(Log(logger, level, event, safe))
    if len(data) <= MAX_MESSAGE_BYTES:
        return data
    limit = MAX_MESSAGE_BYTES // (4 * max(len(safe), 1))
    cut = {k: v[:limit] for k, v in safe.items() if isinstance(v, str) and len(v) > limit}
    return encode(Log(logger, level, event, {**safe, **cut, "truncated": sorted(cut)}))


def choose_receiver(loads: Sequence[int | None], start: int = 0) -> int | None:
    """The receiver to hand the next connection to: the least busy (`loads`: its connections,
    None for one that is not running), ties broken from `start` on (round robin), or None when
    no receiver runs."""
    n = len(loads)
    best: int | None = None
    for k in range(n):
        i = (start + k) % n
        load = loads[i]
        if load is not None and (best is None or load < (loads[best] or 0)):
            best = i
    return best
