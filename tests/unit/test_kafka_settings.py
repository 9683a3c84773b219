"""The Kafka security settings: read as Kafka's own clients name them, refused when they cannot
work together, and the password never printed."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.infra.kafka_clients import client_options
from service.kernel.settings import KafkaConnection, KafkaSecurity

SCRAM = {
    "KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
    "KAFKA_SASL_MECHANISM": "scram-sha-512",
    "KAFKA_SASL_USERNAME": "orders-writer",
}


@pytest.fixture(autouse=True)
def no_kafka_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "KAFKA_SECURITY_PROTOCOL",
        "KAFKA_SASL_MECHANISM",
        "KAFKA_SASL_USERNAME",
        "KAFKA_SASL_PASSWORD",
        "KAFKA_SASL_PASSWORD_FILE",
        "KAFKA_SSL_CAFILE",
        "KAFKA_SSL_CERTFILE",
        "KAFKA_SSL_KEYFILE",
    ):
        monkeypatch.delenv(name, raising=False)


def _set(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    for name, value in values.items():
        monkeypatch.setenv(name, value)


def test_unset_is_plaintext_and_adds_nothing_to_the_clients() -> None:
    security = KafkaSecurity.from_env()
    assert security == KafkaSecurity()
    assert client_options(KafkaConnection("b:9092", security)) == {"bootstrap_servers": "b:9092"}


def test_the_password_comes_from_its_file_and_never_shows(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret-word\n")
    _set(monkeypatch, **SCRAM, KAFKA_SASL_PASSWORD_FILE=str(secret))

    security = KafkaSecurity.from_env()
    options = client_options(KafkaConnection("b:9093", security))

    assert (security.protocol, security.sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-512")
    assert options["sasl_plain_password"] == "s3cret-word"
    assert options["security_protocol"] == "SASL_SSL"
    assert options["ssl_context"].check_hostname  # the brokers' names are verified
    assert "s3cret-word" not in repr(security) + repr(KafkaConnection("b", security))
    assert str(KafkaConnection("b:9093", security)) == "b:9093"


@pytest.mark.parametrize(
    ("settings", "refusal"),
    [
        ({"KAFKA_SECURITY_PROTOCOL": "TLS"}, "use one of PLAINTEXT, SSL, SASL_PLAINTEXT"),
        ({**SCRAM, "KAFKA_SASL_MECHANISM": "GSSAPI"}, "needs KAFKA_SASL_MECHANISM"),
        (SCRAM, "needs KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD"),
        ({"KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": "p"}, "set it to SASL_SSL"),
        (
            {**SCRAM, "KAFKA_SASL_PASSWORD": "p", "KAFKA_SASL_PASSWORD_FILE": "/x"},
            "not both",
        ),
        (
            {**SCRAM, "KAFKA_SASL_PASSWORD_FILE": "/nonexistent/password"},
            "KAFKA_SASL_PASSWORD_FILE=/nonexistent/password: cannot read it",
        ),
        ({"KAFKA_SSL_CAFILE": "/nonexistent/ca.pem"}, "no such file, or not readable"),
    ],
)
def test_settings_that_cannot_work_are_refused_saying_what_to_set(
    monkeypatch: pytest.MonkeyPatch, settings: dict[str, str], refusal: str
) -> None:
    _set(monkeypatch, **settings)
    with pytest.raises(SystemExit, match=refusal):
        KafkaSecurity.from_env()


def test_tls_files_need_a_tls_protocol_and_a_certificate_needs_its_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pem = tmp_path / "any.pem"
    pem.write_text("-")
    _set(monkeypatch, KAFKA_SSL_CAFILE=str(pem))
    with pytest.raises(SystemExit, match="set it to SSL or SASL_SSL"):
        KafkaSecurity.from_env()
    _set(monkeypatch, KAFKA_SECURITY_PROTOCOL="SSL", KAFKA_SSL_CERTFILE=str(pem))
    with pytest.raises(SystemExit, match="both KAFKA_SSL_CERTFILE and KAFKA_SSL_KEYFILE"):
        KafkaSecurity.from_env()
