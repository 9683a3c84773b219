"""Which database errors the projector retries (after a back-off) and which halt or stop it."""

from __future__ import annotations

import asyncpg
import pytest

from projections.applying import transient
from service.infra.database import EncodingRefused, connection_lost


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError("the server is restarting"),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        # A connection left out of step by a server that went away mid-statement (seen when
        # Postgres was killed under load): discarded by ``begin``, so a retry gets a new one.
        asyncpg.InternalClientError(
            "cannot switch to state 15; another operation (2) is in progress"
        ),
        asyncpg.AdminShutdownError("terminating connection due to administrator command"),
        asyncpg.DeadlockDetectedError("deadlock detected"),
        # The database refuses the work, not the event: the environment must change.
        asyncpg.InsufficientPrivilegeError("permission denied for table orders"),
        asyncpg.ReadOnlySQLTransactionError("cannot execute INSERT in a read-only transaction"),
    ],
)
def test_errors_of_an_unavailable_database_are_retried(error: BaseException) -> None:
    assert transient(error)


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.UniqueViolationError("a row stored twice"),
        asyncpg.DataError("a value the column refuses"),
        # An earlier statement of the transaction failed: that one says whose fault it is.
        asyncpg.InFailedSQLTransactionError("current transaction is aborted"),
        # asyncpg's client-side refusal of a value it cannot encode: an InterfaceError.
        EncodingRefused("invalid input for query argument $1: 2147483648 (out of range)"),
        ValueError("a bug"),
    ],
)
def test_errors_of_the_data_or_the_code_are_not_retried(error: BaseException) -> None:
    assert not transient(error)
    assert not connection_lost(error)
