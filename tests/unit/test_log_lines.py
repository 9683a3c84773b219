"""Log lines as an operator's tools read them: one JSON object per line with stable keys and
the context of the call, or readable text; the request's correlation id on every line."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from aiokafka.errors import GroupAuthorizationFailedError, GroupCoordinatorNotAvailableError

from service.edge.logs import (
    CORRELATION_ID,
    Demote,
    JsonFormatter,
    TextFormatter,
    setup,
    write_straight,
)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """``setup`` changes the root logger: give the other tests theirs back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def _record(
    msg: str = "order %s placed", *args: object, exc: bool = False, **extra: object
) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("the database refused it")
        except ValueError:
            exc_info = sys.exc_info()
    logger = logging.getLogger("orders.test")
    return logger.makeRecord(
        logger.name, logging.WARNING, __file__, 1, msg, args or ("o-1",), exc_info, extra=extra
    )


def test_a_json_line_has_the_stable_keys_first_then_the_context() -> None:
    line = JsonFormatter().format(_record(order_id="o-1", partition=3, offset=17))

    entry = json.loads(line)
    assert list(entry) == ["ts", "level", "logger", "msg", "order_id", "partition", "offset"]
    assert entry["level"] == "WARNING"
    assert entry["logger"] == "orders.test"
    assert entry["msg"] == "order o-1 placed"
    assert (entry["order_id"], entry["partition"], entry["offset"]) == ("o-1", 3, 17)
    assert entry["ts"].endswith("Z")
    assert datetime.fromisoformat(entry["ts"].removesuffix("Z")).year >= 2024


def test_a_json_line_is_one_line_whatever_the_message_holds() -> None:
    line = JsonFormatter().format(_record('two\nlines and a "quote" %s', "\x00"))

    assert "\n" not in line
    assert json.loads(line)["msg"] == 'two\nlines and a "quote" \x00'


def test_an_exception_is_in_exc_with_its_traceback() -> None:
    entry = json.loads(JsonFormatter().format(_record(exc=True)))

    assert entry["exc"].startswith("Traceback (most recent call last):")
    assert entry["exc"].rstrip().endswith("ValueError: the database refused it")


def test_context_values_json_cannot_hold_are_written_as_text() -> None:
    entry = json.loads(
        JsonFormatter().format(
            _record(path=Path("/tmp/broker.log"), error=OSError("gone"), ids=["c-1", "c-2"])
        )
    )

    assert entry["path"] == "/tmp/broker.log"
    assert entry["error"] == "gone"
    assert entry["ids"] == ["c-1", "c-2"]


def test_the_requests_correlation_id_is_on_every_line_logged_for_it() -> None:
    token = CORRELATION_ID.set("req-42")
    try:
        during = json.loads(JsonFormatter().format(_record()))
        named = json.loads(JsonFormatter().format(_record(correlation_id="cmd-7")))
    finally:
        CORRELATION_ID.reset(token)
    after = json.loads(JsonFormatter().format(_record()))

    assert during["correlation_id"] == "req-42"
    assert named["correlation_id"] == "cmd-7"  # the call knows better: its own id
    assert "correlation_id" not in after


def test_a_text_line_is_readable_with_the_context_as_key_value() -> None:
    token = CORRELATION_ID.set("req-42")
    try:
        line = TextFormatter().format(
            _record(order_id="o-1", reason="not json", sub=None, exc=True)
        )
    finally:
        CORRELATION_ID.reset(token)

    first, *traceback = line.splitlines()
    assert first.endswith(
        "WARNING orders.test: order o-1 placed correlation_id=req-42 order_id=o-1 reason='not json'"
    )
    assert traceback[0] == "Traceback (most recent call last):"


@pytest.mark.usefixtures("restored_logging")
def test_auto_is_text_on_a_terminal_and_json_lines_otherwise() -> None:
    assert setup("auto", stream=_Tty()) == "text"
    piped = io.StringIO()
    assert setup("auto", stream=piped) == "json"
    assert setup("text", stream=piped) == "text"

    assert setup("json", stream=piped) == "json"
    logging.getLogger("orders.test").info("one", extra={"order_id": "o-1"})
    logging.getLogger("orders.test").info("two")
    lines = piped.getvalue().splitlines()
    assert [json.loads(line)["msg"] for line in lines] == ["one", "two"]


@pytest.mark.usefixtures("restored_logging")
def test_a_coordinator_not_available_yet_is_no_error() -> None:
    out = io.StringIO()
    setup("json", stream=out)
    coordinator = logging.getLogger("aiokafka.consumer.group_coordinator")
    coordinator.error("Group Coordinator Request failed: %s", GroupCoordinatorNotAvailableError())
    coordinator.warning("Marking the coordinator dead (node %s)for group %s.", 1, "g")
    coordinator.error("Group Coordinator Request failed: %s", GroupAuthorizationFailedError())
    assert [json.loads(line)["level"] for line in out.getvalue().splitlines()] == ["ERROR"]

    out.truncate(0)
    out.seek(0)
    setup("json", verbose=True, stream=out)
    coordinator.error("Group Coordinator Request failed: %s", GroupCoordinatorNotAvailableError())
    assert [json.loads(line)["level"] for line in out.getvalue().splitlines()] == ["INFO"]
    assert sum(isinstance(f, Demote) for f in coordinator.filters) == 1


@pytest.mark.usefixtures("restored_logging")
def test_a_line_written_straight_is_the_line_the_handler_writes() -> None:
    out = io.StringIO()
    setup("json", stream=out)
    logger = logging.getLogger("orders.access")
    context = {"method": "POST", "status": 201, "sub": None, "order_id": "o-1"}
    logger.info("POST /orders 201", extra=context)
    assert write_straight(logger, "POST /orders 201", context)

    through_logging, straight = (json.loads(line) for line in out.getvalue().splitlines())
    assert list(straight) == list(through_logging)
    assert {**straight, "ts": None} == {**through_logging, "ts": None}
    assert abs(_parsed(straight["ts"]) - _parsed(through_logging["ts"])) < 5


@pytest.mark.usefixtures("restored_logging")
def test_nothing_is_written_straight_unless_logging_is_as_set_up() -> None:
    logger = logging.getLogger("orders.access")
    out = io.StringIO()
    setup("text", stream=out)
    assert not write_straight(logger, "text lines", {})
    setup("json", stream=out)
    logging.getLogger().addHandler(logging.StreamHandler(io.StringIO()))  # someone else's
    assert not write_straight(logger, "another handler", {})
    assert out.getvalue() == ""


@pytest.mark.usefixtures("restored_logging")
async def test_lines_written_straight_go_out_together_and_in_order() -> None:
    out = io.StringIO()
    setup("json", stream=out)
    access, other = logging.getLogger("orders.access"), logging.getLogger("orders.test")
    assert write_straight(access, "first", {})
    assert write_straight(access, "second", {})
    assert out.getvalue() == ""  # held until the loop has run what is ready
    other.warning("third")  # a line logged the usual way: the held ones go first
    assert write_straight(access, "fourth", {})
    # The loop runs its callbacks in the order they were scheduled: once this one has run, so
    # has the write scheduled before it.
    loop = asyncio.get_running_loop()
    after_the_write = loop.create_future()
    loop.call_soon(after_the_write.set_result, None)
    await after_the_write

    lines = [json.loads(line)["msg"] for line in out.getvalue().splitlines()]
    assert lines == ["first", "second", "third", "fourth"]


def _parsed(timestamp: str) -> float:
    return datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()
