"""What the CLI says about a writer that refuses its topic: one line, no traceback."""

from __future__ import annotations

import pytest

from service.cli import _operator_advice
from service.eventlog import TopicRepartitioned
from service.writer import OpenTransactionInLog


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
