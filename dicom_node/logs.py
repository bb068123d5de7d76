"""Structured logging: structlog to stdout, JSON in production, stdlib loggers through the same
pipeline (pynetdicom, pydicom). Event names are stable identifiers (`instance.stored`,
`series.done`, ...) that operators can alert on.

No PHI in anything the process writes. The policy, in layers:

1. Our own events carry UIDs, AE titles, counts, states and event names, never patient names, IDs
   or birth dates. Their structured fields are trusted and left intact; `drop_phi` replaces any
   field whose *key* looks like a patient attribute, as a safety net.
2. Text we do not control is redacted with `redact`: the message of every record from a stdlib
   logger (pydicom, pynetdicom, `py.warnings`, ...), the `error` field of our own events, and the
   message of every exception that is logged, stored or printed (`safe_error_text`). `redact`
   replaces
   - every quoted value: `'...'`, `"..."` and their `b'...'`/`u'...'`/`r'...'` forms, as Python's
     repr and both DICOM libraries quote values (an unclosed quote is redacted to the end of the
     line). Kept: DICOM standard UIDs (`1.2.840.10008.*`: SOP classes, transfer syntaxes), tags
     written as `(gggg,eeee)`, VR codes, DICOM keywords and element names ('Affected SOP
     Instance UID'), none of which can be a patient's data;
   - every token that contains `^` (a DICOM person name: `DOE^JANE`);
   - every token that contains a control character (raw bytes of a misparsed dataset).
   What stays readable: the sentence, the exception type, tags, counts, standard UIDs.
3. Tracebacks are rendered by `safe_traceback`: file, line, function and source lines (code, not
   data) as Python prints them, each exception's message through `redact`, never local variables.
   The same renderer handles `exc_info` in our events and in stdlib records.
4. Process hooks (`install_process_hooks`): Python warnings go through logging
   (`logging.captureWarnings`), uncaught exceptions in the main thread (`sys.excepthook`), in other
   threads (`threading.excepthook`; pynetdicom runs one thread per association) and unraisable
   ones become log events with safe tracebacks; a record that cannot be formatted is reported by
   its logger name and error type only, never by its message or arguments (logging's default
   prints both to stderr).
5. Chatter is reduced at source (`quiet_dicom_libraries`): pydicom does not validate values while
   reading (the node validates the identifiers it uses itself), so its warnings that quote raw
   values are not produced; pynetdicom does not dump C-FIND/C-GET/C-MOVE identifiers.

`configure_process` applies all of it once, at the start-up of `ltdiff-node serve`.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import threading
import traceback
from collections.abc import MutableMapping
from types import TracebackType
from typing import Any, TextIO

import pydicom.config
import structlog
from pydicom.datadict import dictionary_description, keyword_dict
from pydicom.valuerep import VR
from pynetdicom import _config as pynetdicom_config

_PHI_KEY_FRAGMENTS = ("patient", "birth", "accession", "other_patient")

#: Fields of our own events that hold free text from exceptions (redacted like foreign text).
_FREE_TEXT_KEYS = ("error",)

REDACTED = "[redacted]"

_QUOTED = re.compile(
    r"""(?<!\w)(?P<prefix>[bBrRuU]{1,2})?(?P<quote>['"])"""  # opening quote, optional b/r/u prefix
    r"""(?P<body>(?:\\.|(?!(?P=quote)(?!\w)).)*)"""  # escapes, or anything but a closing quote
    r"""(?:(?P=quote)(?!\w)|$)""",  # a closing quote not inside a word, or the end of the line
    re.MULTILINE,
)
_PERSON_NAME = re.compile(r"\S*\^\S*")
_CONTROL = re.compile(r"\S*[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]\S*")
_STANDARD_UID = re.compile(r"1\.2\.840\.10008(\.(0|[1-9][0-9]*))*")
_TAG = re.compile(r"\(?[0-9A-Fa-f]{4},\s?[0-9A-Fa-f]{4}\)?")
_VRS = frozenset(vr.value for vr in VR)
_ELEMENT_NAMES = frozenset(dictionary_description(tag) for tag in keyword_dict.values()) - {""}


def _keeps(body: str) -> bool:
    """Quoted text that can never be a patient's data."""
    return (
        body == ""
        or body in _VRS
        or _STANDARD_UID.fullmatch(body) is not None
        or _TAG.fullmatch(body) is not None
        or body in keyword_dict
        or body in _ELEMENT_NAMES
    )


def _redact_quoted(m: re.Match[str]) -> str:
    if _keeps(m.group("body")) and m.group(0).endswith(m.group("quote")) and len(m.group(0)) > 1:
        return m.group(0)
    q = m.group("quote")
    return f"{m.group('prefix') or ''}{q}{REDACTED}{q}"


def redact(text: str) -> str:
    """`text` with the values it may quote replaced by `[redacted]` (policy in the module
    docstring). Idempotent."""
    text = _QUOTED.sub(_redact_quoted, text)
    text = _PERSON_NAME.sub(REDACTED, text)
    return _CONTROL.sub(REDACTED, text)


def _redacted_message(exc: BaseException) -> str:
    try:
        return redact(str(exc))
    except Exception:  # noqa: BLE001 - a broken __str__ must not break error handling
        return ""


def safe_error_text(exc: BaseException) -> str:
    """`Type: message` of an exception, message redacted: what the node logs, stores as a job's
    error and shows in `ltdiff-node status`."""
    message = _redacted_message(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _qualified_name(exc: BaseException) -> str:
    module = type(exc).__module__
    name = type(exc).__qualname__
    return name if module in ("builtins", "__main__") else f"{module}.{name}"


def safe_traceback(exc: BaseException) -> str:
    """The traceback Python would print for `exc` (chained causes and contexts, notes, groups),
    with every exception message redacted and no local variables."""
    lines: list[str] = []
    seen: set[int] = set()

    def walk(e: BaseException, indent: str) -> None:
        seen.add(id(e))
        cause, context = e.__cause__, e.__context__
        if cause is not None and id(cause) not in seen:
            walk(cause, indent)
            lines.append(
                f"\n{indent}The above exception was the direct cause of the following exception:"
                "\n\n"
            )
        elif context is not None and not e.__suppress_context__ and id(context) not in seen:
            walk(context, indent)
            lines.append(
                f"\n{indent}During handling of the above exception, another exception occurred:\n\n"
            )
        if e.__traceback__ is not None:
            lines.append(f"{indent}Traceback (most recent call last):\n")
            frames = traceback.StackSummary.extract(traceback.walk_tb(e.__traceback__))
            lines.extend(indent + frame for frame in frames.format())
        message = _redacted_message(e)
        lines.append(f"{indent}{_qualified_name(e)}{': ' + message if message else ''}\n")
        for note in getattr(e, "__notes__", ()):
            lines.append(f"{indent}{redact(str(note))}\n")
        if isinstance(e, BaseExceptionGroup):
            for i, sub in enumerate(e.exceptions, 1):
                lines.append(f"{indent}+---------------- {i} ----------------\n")
                if id(sub) not in seen:
                    walk(sub, indent + "    ")

    walk(exc, "")
    return "".join(lines).rstrip("\n")


def _exception_of(exc_info: Any) -> BaseException | None:
    if isinstance(exc_info, BaseException):
        return exc_info
    if isinstance(exc_info, tuple):
        return exc_info[1] if len(exc_info) == 3 else None
    return sys.exc_info()[1]  # exc_info=True


def render_exc_info(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> Any:
    """Processor: `exc_info` (ours or a stdlib record's) becomes `exception`, a safe traceback.
    Replaces structlog's format_exc_info, which prints exception messages as they are."""
    exc_info = event_dict.pop("exc_info", None)
    if exc_info:
        exc = _exception_of(exc_info)
        if exc is not None:
            event_dict["exception"] = safe_traceback(exc)
    return event_dict


def redact_foreign(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> Any:
    """Processor for stdlib records (pydicom, pynetdicom, py.warnings): redact the message."""
    event = event_dict.get("event")
    if isinstance(event, str):
        event_dict["event"] = redact(event)
    return event_dict


def drop_phi(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> Any:
    for key in list(event_dict):
        if any(f in key.lower() for f in _PHI_KEY_FRAGMENTS):
            event_dict[key] = "[removed: PHI]"
        elif key in _FREE_TEXT_KEYS and isinstance(event_dict[key], str):
            event_dict[key] = redact(event_dict[key])
    return event_dict


class _SafeStreamHandler(logging.StreamHandler[TextIO]):
    """A record that cannot be formatted is reported without its message and arguments (the
    default handleError prints both, and a traceback, to stderr)."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        exc = sys.exc_info()[1]
        with contextlib.suppress(Exception):  # nowhere left to report to
            sys.stderr.write(
                f"log record from {record.name!r} dropped: it could not be formatted "
                f"({type(exc).__name__ if exc else 'unknown error'})\n"
            )


def configure_logging(fmt: str = "auto", level: str = "info") -> None:
    """Configure structlog and the stdlib root logger once, at start-up."""
    json_output = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        drop_phi,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json_output
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            render_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = _SafeStreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, redact_foreign],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                render_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pynetdicom logs every PDU at debug and each association at info; keep its warnings.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if level == "debug" else logging.WARNING)


def _log_uncaught(
    exc_type: type[BaseException], exc: BaseException | None, tb: TracebackType | None
) -> None:
    if exc is None:
        exc = exc_type()
    if exc.__traceback__ is None and tb is not None:
        exc = exc.with_traceback(tb)
    get_logger("dicom_node.process").critical("process.uncaught_exception", exc_info=exc)


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    exc = args.exc_value if args.exc_value is not None else args.exc_type()
    if exc.__traceback__ is None and args.exc_traceback is not None:
        exc = exc.with_traceback(args.exc_traceback)
    thread = args.thread.name if args.thread is not None else None
    get_logger("dicom_node.process").error("thread.uncaught_exception", thread=thread, exc_info=exc)


def _log_unraisable(args: Any) -> None:
    get_logger("dicom_node.process").error(
        "process.unraisable_exception",
        object_type=type(args.object).__name__,
        exc_info=args.exc_value,
    )


def install_process_hooks() -> None:
    """Route Python warnings and uncaught exceptions (any thread) through the log pipeline."""
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_thread_exception
    sys.unraisablehook = _log_unraisable


def quiet_dicom_libraries() -> None:
    """Stop pydicom and pynetdicom from producing messages that quote dataset values where those
    messages have no operational value for the node."""
    # Values are not validated while reading: invalid values are otherwise reported by warnings
    # that quote them, raw bytes included. The node checks what it relies on (UIDs) itself;
    # values it cannot use still fail the job with a (redacted) error.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    # The node serves no C-FIND/C-GET/C-MOVE; never dump identifiers (patient data) if it did.
    pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
    pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False


def configure_process(fmt: str = "auto", level: str = "info") -> None:
    """Everything start-up sets once for the whole process: logging, hooks, DICOM libraries."""
    configure_logging(fmt, level)
    install_process_hooks()
    quiet_dicom_libraries()


def get_logger(name: str) -> Any:
    return structlog.stdlib.get_logger(name)
