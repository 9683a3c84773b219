"""How the processes log: one JSON object per line (``ORDERS_LOG_FORMAT=json``, the default
off a terminal) or readable text (``text``, the default on one); docs/telemetry.md, "Logs".

Every line has ``ts`` (ISO 8601, UTC), ``level``, ``logger`` and ``msg``, then its context:
whatever the call passed as ``extra=`` (``order_id``, ``projection``, ``partition``...) and the
correlation id of the request being served (``CORRELATION_ID``, set by the HTTP middleware),
then ``exc`` with the traceback of an exception. The formatters run once per request for the
access log, so they are kept to a few microseconds a line: no ``%``-style templates, one
msgspec encode.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any, TextIO

import msgspec

# The correlation id of the request this code runs for (None outside a request).
CORRELATION_ID: ContextVar[str | None] = ContextVar("correlation_id", default=None)

FORMATS = ("auto", "json", "text")
# Libraries that talk a lot at INFO: only their warnings, unless -v.
NOISY_LOGGERS = ("aiokafka", "kafka", "uvicorn.error", "httpx", "alembic")
ACCESS_LOGGER = "orders.access"

# What every LogRecord carries by itself: anything else on a record came in ``extra=``.
_RECORD_ATTRIBUTES = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None)).keys()
    | {"message", "asctime", "taskName"}
)


def context_of(record: logging.LogRecord) -> Iterator[tuple[str, Any]]:
    """A record's context: the request's correlation id (unless the call named one), then
    what the call passed as ``extra=``, in its order."""
    fields = record.__dict__
    if "correlation_id" not in fields:
        correlation_id = CORRELATION_ID.get()
        if correlation_id is not None:
            yield "correlation_id", correlation_id
    for key, value in fields.items():
        if key not in _RECORD_ATTRIBUTES:
            yield key, value


def _as_text(value: Any) -> str:
    """What msgspec cannot encode by itself (an exception, a path): its ``str``."""
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg``, context, ``exc``."""

    def __init__(self) -> None:
        super().__init__()
        self._encoder = msgspec.json.Encoder(enc_hook=_as_text)
        self._second = (-1, "")

    def timestamp(self, created: float) -> str:
        """``created`` (seconds since the epoch) as ISO 8601 in UTC, to the millisecond."""
        second = int(created)
        cached = self._second  # (second, its text): one tuple, so no thread sees half of it
        if cached[0] != second:
            cached = self._second = (
                second,
                time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)),
            )
        return "%s.%03dZ" % (cached[1], (created - second) * 1000)  # noqa: UP031

    def encode(self, line: dict[str, Any]) -> str:
        try:
            return self._encoder.encode(line).decode()
        except (TypeError, ValueError, OverflowError):  # a context value msgspec refuses
            return self._encoder.encode({k: _plain(v) for k, v in line.items()}).decode()

    def format(self, record: logging.LogRecord) -> str:
        fields = record.__dict__
        line: dict[str, Any] = {
            "ts": self.timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if "correlation_id" not in fields:
            correlation_id = CORRELATION_ID.get()
            if correlation_id is not None:
                line["correlation_id"] = correlation_id
        for key in fields:
            if key not in _RECORD_ATTRIBUTES:
                line[key] = fields[key]
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return self.encode(line)


def _plain(value: Any) -> Any:
    return value if isinstance(value, str | int | float | bool | None) else repr(value)


class TextFormatter(logging.Formatter):
    """A line for a person: time, level, logger, message, then the context as ``key=value``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        line = super().formatMessage(record)
        context = " ".join(
            f"{key}={_text_value(value)}" for key, value in context_of(record) if value is not None
        )
        return f"{line} {context}" if context else line


def _text_value(value: Any) -> str:
    text = str(value)
    return text if text and " " not in text and "=" not in text else repr(text)


class Demote(logging.Filter):
    """Lowers the level of a library's lines about conditions that are normal while a broker
    starts or a group rebalances (a retriable Kafka error, a coordinator marked dead and
    looked up again), and drops them unless their logger is enabled at the lower level."""

    def __init__(self, logger: logging.Logger, level: int = logging.INFO) -> None:
        super().__init__()
        self.logger = logger
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= self.level or not _normal_while_starting(record):
            return True
        record.levelno = self.level
        record.levelname = logging.getLevelName(self.level)
        return self.logger.isEnabledFor(self.level)


def _normal_while_starting(record: logging.LogRecord) -> bool:
    if isinstance(record.msg, str) and record.msg.startswith("Marking the coordinator dead"):
        return True
    arguments = record.args if isinstance(record.args, tuple) else ()
    # aiokafka's errors say whether a retry can succeed (GroupCoordinatorNotAvailable,
    # NotCoordinator, CoordinatorLoadInProgress...): those it retries by itself.
    return any(getattr(argument, "retriable", False) is True for argument in arguments)


# aiokafka's logger that reports, at ERROR or WARNING, what it retries by itself while a
# broker starts: the group coordinator not available yet (its other errors stay as they are).
_DEMOTED_LOGGERS = ("aiokafka.consumer.group_coordinator",)


def resolved_format(log_format: str, stream: TextIO) -> str:
    """``json`` or ``text``; ``auto``: text on a terminal, JSON lines otherwise."""
    if log_format not in FORMATS:
        raise ValueError(f"log format {log_format!r}: use one of {', '.join(FORMATS)}")
    if log_format != "auto":
        return log_format
    return "text" if stream.isatty() else "json"


class JsonLines(logging.StreamHandler[TextIO]):
    """The handler of JSON lines, which also takes lines made without a ``LogRecord``
    (``write_straight``). Those are written together, once the event loop has run what is
    ready now (under load, the access lines of dozens of requests in one write instead of a
    write each); a line logged the usual way, a ``flush`` and the exit write them first, so
    the order of the lines is the order they were made in."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self.setFormatter(JsonFormatter())
        self._pending: list[str] = []

    def add(self, line: str) -> None:
        """Write ``line`` (one JSON object, without its newline) soon."""
        with self.lock or contextlib.nullcontext():
            if not self._pending:
                try:
                    asyncio.get_running_loop().call_soon(self.flush)
                except RuntimeError:  # no event loop here: write it now
                    self.stream.write(line + self.terminator)
                    self.stream.flush()
                    return
            self._pending.append(line + self.terminator)

    def flush(self) -> None:
        with self.lock or contextlib.nullcontext():
            if self._pending:
                self.stream.write("".join(self._pending))
                self._pending.clear()
            super().flush()

    def emit(self, record: logging.LogRecord) -> None:
        if self._pending:  # called holding the lock: flush takes it again (an RLock)
            self.flush()
        super().emit(record)


class _Installed:
    """The JSON handler ``setup`` installed, for ``write_straight``."""

    handler: JsonLines | None = None


def write_straight(logger: logging.Logger, message: str, context: dict[str, Any]) -> bool:
    """Write an INFO line of ``logger`` with ``context`` as JSON, the line its handler would
    have written, but without a ``LogRecord`` and the trip through ``logging``, and together
    with the other lines made while the event loop ran (``JsonLines``): about 6 us a line
    instead of 13 to 20 through ``logging`` (in-process), for the access log's line per
    request. False, writing nothing, unless logging is as ``setup`` left it with JSON lines
    (not with text lines, or a handler or filter added since): then the caller logs as usual.
    """
    handler = _Installed.handler
    root = logging.root
    if (
        handler is None
        or len(root.handlers) != 1
        or root.handlers[0] is not handler
        or logger.handlers
        or logger.filters
        or handler.filters
    ):
        return False
    formatter = handler.formatter
    assert isinstance(formatter, JsonFormatter)
    line: dict[str, Any] = {
        "ts": formatter.timestamp(time.time()),
        "level": "INFO",
        "logger": logger.name,
        "msg": message,
    }
    line.update(context)
    handler.add(formatter.encode(line))
    return True


def setup(log_format: str, *, verbose: bool = False, stream: TextIO | None = None) -> str:
    """Send every log line to ``stream`` (stderr) in ``log_format``; the libraries' own chatter
    only with ``verbose``. Returns the format chosen (``json`` or ``text``)."""
    out = stream if stream is not None else sys.stderr
    chosen = resolved_format(log_format, out)
    handler: logging.Handler
    if chosen == "json":
        handler = _Installed.handler = JsonLines(out)
    else:
        handler = logging.StreamHandler(out)
        handler.setFormatter(TextFormatter())
        _Installed.handler = None
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.INFO if verbose else logging.WARNING)
    for name in _DEMOTED_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, Demote) for f in logger.filters):
            logger.addFilter(Demote(logger))
    # Nothing here prints a thread or process name: do not look them up for every line.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    return chosen
