"""What the CLI says about a writer that refuses its topic: one line, no traceback."""

from __future__ import annotations

import pytest

from service.edge.cli.main import _operator_advice
from service.infra.eventlog import TopicRepartitioned
from service.write.writer import OpenTransactionInLog


@pytest.mark.parametrize(
    "error",
    [
        TopicRepartitioned("orders.events", "o-1", 1, 7, 12),
        OpenTransactionInLog("orders.events", {2: (10, 12)}),
    ],
)
def test_a_topic_the_writer_refuses_is_explained_in_one_line(error: Exception) -> None:
    advice = _operator_advice(error)

    assert advice == str(error)
    assert "\n" not in advice


def _handle_a_lost_connection_with_a_bug() -> None:
    try:
        raise ConnectionRefusedError("the server went away")
    except ConnectionRefusedError:
        raise KeyError("a bug in the handler")  # noqa: B904 - the bug under test


def test_a_bug_raised_while_handling_a_lost_connection_keeps_its_traceback() -> None:
    """Advice follows what caused an error, not what was being handled when it came."""
    with pytest.raises(KeyError) as bug:
        _handle_a_lost_connection_with_a_bug()

    assert isinstance(bug.value.__context__, ConnectionRefusedError)
    assert _operator_advice(bug.value) is None
