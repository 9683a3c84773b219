"""Which database URL and password each process uses (docs/security.md): its own URL or
DATABASE_URL, a password from a file that never shows."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from service.infra.database import shown_url, with_password
from service.kernel.errors import EnvironmentProblem
from service.kernel.settings import Settings


def test_each_process_has_its_own_database_url_and_falls_back_to_database_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://owner@db/orders")
    monkeypatch.setenv("ORDERS_API_DATABASE_URL", "postgresql://api@db/orders")
    monkeypatch.delenv("ORDERS_PROJECTOR_DATABASE_URL", raising=False)
    monkeypatch.delenv("ORDERS_DATABASE_PASSWORD_FILE", raising=False)
    settings = Settings.from_env()

    assert settings.require_database("api") == "postgresql+asyncpg://api@db/orders"
    assert settings.require_database("projector") == "postgresql+asyncpg://owner@db/orders"
    assert settings.require_database() == "postgresql+asyncpg://owner@db/orders"


def test_a_missing_database_url_names_the_variables_to_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("DATABASE_URL", "ORDERS_API_DATABASE_URL", "ORDERS_PROJECTOR_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)

    with pytest.raises(SystemExit, match="ORDERS_PROJECTOR_DATABASE_URL or DATABASE_URL is not"):
        Settings.from_env().require_database("projector")


def test_the_password_comes_from_a_file_and_never_shows(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cr@t/pw\n")
    monkeypatch.setenv("ORDERS_DATABASE_PASSWORD_FILE", str(secret))
    monkeypatch.setenv("DATABASE_URL", "postgresql://owner@db:5432/orders?sslmode=require")
    settings = Settings.from_env()

    url = with_password(settings.require_database(), settings.database_password)
    assert make_url(url).password == "s3cr@t/pw"
    assert make_url(url).query == {"sslmode": "require"}
    assert "s3cr" not in repr(settings)
    assert "s3cr" not in shown_url(url)
    own = "postgresql+asyncpg://projector:own@db/orders"
    assert with_password(own, settings.database_password) == own  # a URL's own password wins


def test_a_password_for_a_url_without_a_user_is_refused_with_one_line() -> None:
    with pytest.raises(EnvironmentProblem, match="names no user") as raised:
        with_password("postgresql://db/orders", "pw")
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(("content", "message"), [(None, "cannot read it"), ("", "is empty")])
def test_a_password_file_that_cannot_be_used_gets_one_line_saying_what_to_do(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, content: str | None, message: str
) -> None:
    secret = tmp_path / "password"
    if content is not None:
        secret.write_text(content)
    monkeypatch.setenv("ORDERS_DATABASE_PASSWORD_FILE", str(secret))

    with pytest.raises(SystemExit, match=message) as raised:
        Settings.from_env()
    assert "\n" not in str(raised.value)
