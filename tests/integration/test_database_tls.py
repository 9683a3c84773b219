"""DATABASE_URL with ``sslmode`` (design.md, invariant 11): against a real PostgreSQL that
accepts TLS connections only, with a CA and a server certificate made for this run (the
embedded wheel's build has no SSL: the machine's PostgreSQL serves these tests).

``require`` and ``verify-full`` with ``sslrootcert`` migrate and query through the service's
own engine; a certificate of another CA and a connection without TLS end ``orders migrate``
with one line saying what to do, not a traceback.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from service.edge.bootstrap import migrate_database
from service.infra.database import create_engine
from service.infra.embedded.certificates import ServerCertificate, server_certificate
from service.infra.embedded.postgres import LocalPostgres, ServerTls
from tests.support.database import admin
from tests.support.tls import ssl_capable_bin_dir

PROJECT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> tuple[ServerCertificate, Path]:
    """The server's certificate (and the CA that signed it), and another CA's file."""
    folder = tmp_path_factory.mktemp("tls")
    another = server_certificate(folder, "another").ca_file
    return server_certificate(folder, "postgres"), another


@pytest.fixture(scope="module")
def tls_server(certificates: tuple[ServerCertificate, Path]) -> Iterator[LocalPostgres]:
    """A PostgreSQL that refuses connections without TLS."""
    ours = certificates[0]
    server = LocalPostgres(
        tls=ServerTls(ours.certificate_file, ours.key_file, only=True),
        bin_dir=ssl_capable_bin_dir(),
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _url(server: LocalPostgres, database: str, query: str, scheme: str = "postgresql") -> str:
    return f"{scheme}://postgres@127.0.0.1:{server.port}/{database}?{query}"


@pytest.mark.parametrize(
    ("scheme", "query"),
    [
        ("postgresql", "sslmode=require"),
        ("postgresql+asyncpg", "sslmode=verify-full&sslrootcert={ca}"),
        ("postgresql", "sslrootcert={ca}&sslmode=verify-ca"),
    ],
)
async def test_a_tls_url_migrates_and_queries_through_the_services_engine(
    tls_server: LocalPostgres,
    certificates: tuple[ServerCertificate, Path],
    scheme: str,
    query: str,
) -> None:
    query = query.format(ca=certificates[0].ca_file)
    database = f"tls_{uuid.uuid4().hex[:8]}"
    await admin(_url(tls_server, "postgres", query, scheme), f'CREATE DATABASE "{database}"')
    url = _url(tls_server, database, query, scheme)

    await migrate_database(url)

    engine = create_engine(url.replace("postgresql://", "postgresql+asyncpg://", 1))
    try:
        async with engine.connect() as connection:
            encrypted = await connection.scalar(
                text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            )
            orders = await connection.scalar(text("SELECT count(*) FROM orders"))
    finally:
        await engine.dispose()
    assert (encrypted, orders) == (True, 0)


def _orders_migrate(url: str, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": url, **extra}
    return subprocess.run(
        [sys.executable, "-m", "service.edge.cli.main", "migrate"],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def test_a_certificate_of_another_ca_ends_orders_migrate_with_one_line(
    tls_server: LocalPostgres, certificates: tuple[ServerCertificate, Path]
) -> None:
    other_ca = certificates[1]
    done = _orders_migrate(
        _url(tls_server, "postgres", f"sslmode=verify-full&sslrootcert={other_ca}")
    )

    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"orders: PostgreSQL at 127.0.0.1:{tls_server.port}/postgres ")
    assert "TLS certificate that does not verify" in line
    assert "sslrootcert" in line


def test_a_connection_without_tls_to_a_server_that_requires_it_gets_one_line(
    tls_server: LocalPostgres,
) -> None:
    done = _orders_migrate(_url(tls_server, "postgres", "sslmode=disable"))

    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "refused the login" in line
    assert "set sslmode=require" in line


async def test_the_password_comes_from_its_file_and_never_shows(
    tls_server: LocalPostgres, tmp_path: Path
) -> None:
    """A login with a password (scram-sha-256 in pg_hba.conf): ``orders migrate`` reads it from
    ORDERS_DATABASE_PASSWORD_FILE; a wrong one is refused in one line that shows neither."""
    login, password = f"t_pw_{uuid.uuid4().hex[:6]}", f"right-{uuid.uuid4().hex}"
    superuser = _url(tls_server, "postgres", "sslmode=require")
    assert tls_server.data_dir is not None
    hba = tls_server.data_dir / "cluster" / "pg_hba.conf"
    hba.write_text(f"hostssl all {login} 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
    await admin(superuser, f"CREATE ROLE {login} LOGIN PASSWORD '{password}'")
    await admin(superuser, f"CREATE DATABASE {login} OWNER {login}")
    await admin(superuser, "SELECT pg_reload_conf()")
    url = _url(tls_server, login, "sslmode=require").replace("postgres@", f"{login}@", 1)
    right, wrong = tmp_path / "right", tmp_path / "wrong"
    right.write_text(password + "\n")
    wrong.write_text("wrong-secret-123\n")

    refused = await asyncio.to_thread(
        _orders_migrate, url, ORDERS_DATABASE_PASSWORD_FILE=str(wrong)
    )
    migrated = await asyncio.to_thread(
        _orders_migrate, url, ORDERS_DATABASE_PASSWORD_FILE=str(right)
    )

    assert refused.returncode == 2, refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert "refused the login" in line
    assert "wrong-secret" not in line
    assert migrated.returncode == 0, migrated.stderr
    assert password not in migrated.stdout + migrated.stderr
