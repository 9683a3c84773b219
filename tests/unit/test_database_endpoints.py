"""Where a DATABASE_URL sends a client, as libpq and asyncpg read it: the reachability check
and its error messages look exactly there (issue 21: a Unix socket URL was refused)."""

from __future__ import annotations

import inspect
import socket
from pathlib import Path

import pytest
from asyncpg import connect_utils

from service.infra.database import driver_dsn
from service.infra.embedded.postgres import (
    DEFAULT_SOCKET_DIRECTORIES,
    check_reachable,
    endpoints,
)
from service.kernel.errors import EnvironmentProblem


@pytest.mark.parametrize(
    ("url", "environ", "expected"),
    [
        ("postgresql://u@db.example:6432/orders", {}, ["db.example:6432"]),
        ("postgresql+asyncpg://u@127.0.0.1/orders", {}, ["127.0.0.1:5432"]),
        ("postgresql://u@/orders?host=/var/run/pg", {}, ["/var/run/pg/.s.PGSQL.5432"]),
        ("postgresql://u@/orders?host=/sock&port=5433", {}, ["/sock/.s.PGSQL.5433"]),
        ("postgresql://u@/orders", {"PGHOST": "/pgh", "PGPORT": "7"}, ["/pgh/.s.PGSQL.7"]),
        ("postgresql://u@/orders?host=a,b&port=1,2", {}, ["a:1", "b:2"]),
        (
            "postgresql:///orders",
            {},
            [*(f"{d}/.s.PGSQL.5432" for d in DEFAULT_SOCKET_DIRECTORIES), "localhost:5432"],
        ),
    ],
)
def test_endpoints_follow_libpq(url: str, environ: dict[str, str], expected: list[str]) -> None:
    assert endpoints(url, environ) == expected


def test_an_absent_socket_is_reported_by_its_path(tmp_path: Path) -> None:
    url = f"postgresql://u@/orders?host={tmp_path}&port=5999"
    with pytest.raises(EnvironmentProblem, match=f"at {tmp_path}/.s.PGSQL.5999 from DATABASE_URL"):
        check_reachable(url, timeout=1)


def test_a_listening_socket_is_reachable(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / ".s.PGSQL.5999"))
        server.listen()
        check_reachable(f"postgresql://u@/orders?host={tmp_path}&port=5999", timeout=1)


def _where_asyncpg_looks(url: str) -> list[str]:
    """asyncpg's own reading of the DSN the service hands it (``driver_dsn``): the addresses
    it will try, in order. Its parser is private: every keyword but ``dsn`` left unset."""
    parse = connect_utils._parse_connect_dsn_and_args
    unset = {name: None for name in inspect.signature(parse).parameters if name != "dsn"}
    addresses, _ = parse(dsn=driver_dsn(url), **unset)
    return [a if isinstance(a, str) else f"{a[0]}:{a[1]}" for a in addresses]


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://u:pw@db.example:6432/orders?sslmode=require",
        "postgresql+asyncpg://u@127.0.0.1/orders?sslmode=disable&application_name=orders",
        "postgresql://u@/orders?host=/var/run/pg",
        "postgresql://u@/orders?host=/sock&port=5433",
        "postgresql://u@/orders?host=a,b&port=1,2",
        "postgresql://u@/orders",
    ],
)
def test_the_reachability_check_looks_where_the_driver_will_connect(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("PGHOST", "PGPORT"):
        monkeypatch.delenv(name, raising=False)

    assert endpoints(url, {}) == _where_asyncpg_looks(url)
