"""The options every Kafka client of the service is made with: where the brokers are and how
to authenticate and encrypt (``KafkaSecurity``), in one place, so no client is left plain."""

from __future__ import annotations

import ssl
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.helpers import create_ssl_context
from aiokafka.protocol.metadata import MetadataRequest

from service.kernel.errors import EnvironmentProblem
from service.kernel.settings import KafkaConnection, KafkaSecurity

# A plain bootstrap string (tests, tools) or a connection with its security settings.
KafkaTarget = KafkaConnection | str


def _never_ask_for_auto_creation() -> None:
    """Make aiokafka's metadata requests say ``allow_auto_topic_creation=false`` unless told
    otherwise. It says true, always: a producer or consumer refreshing the metadata of a topic
    that was deleted would then have a stock broker (``auto.create.topics.enable=true``)
    create it again, with 7-day retention. aiokafka has no option for it, and builds its
    requests inside its clients, so the default of the request class is changed, once."""
    original = MetadataRequest.__init__

    def without_auto_creation(
        self: MetadataRequest,
        topics: list[str] | None = None,
        allow_auto_topic_creation: bool | None = None,
    ) -> None:
        original(self, topics, bool(allow_auto_topic_creation))

    MetadataRequest.__init__ = without_auto_creation


_never_ask_for_auto_creation()


def connection(kafka: KafkaTarget) -> KafkaConnection:
    return kafka if isinstance(kafka, KafkaConnection) else KafkaConnection(kafka)


def client_options(kafka: KafkaTarget) -> dict[str, Any]:
    """Keyword arguments for any aiokafka client (producer, consumer, admin)."""
    target = connection(kafka)
    options: dict[str, Any] = {"bootstrap_servers": target.bootstrap_servers}
    options.update(_security_options(target.security))
    return options


def _security_options(security: KafkaSecurity) -> dict[str, Any]:
    if security.protocol == "PLAINTEXT":
        return {}
    options: dict[str, Any] = {"security_protocol": security.protocol}
    if security.uses_tls:
        options["ssl_context"] = _ssl_context(security)
    if security.uses_sasl:
        options["sasl_mechanism"] = security.sasl_mechanism
        options["sasl_plain_username"] = security.sasl_username
        options["sasl_plain_password"] = security.sasl_password
    return options


def _ssl_context(security: KafkaSecurity) -> ssl.SSLContext:
    """Verifies the brokers' certificates and host names (against KAFKA_SSL_CAFILE, else the
    system's CAs); presents a client certificate when one is configured."""
    try:
        context: ssl.SSLContext = create_ssl_context(
            cafile=security.ssl_cafile,
            certfile=security.ssl_certfile,
            keyfile=security.ssl_keyfile,
        )
    except (OSError, ssl.SSLError) as error:
        raise EnvironmentProblem(
            "cannot load the Kafka TLS files (KAFKA_SSL_CAFILE, KAFKA_SSL_CERTFILE, "
            f"KAFKA_SSL_KEYFILE): {error}; they must be PEM files"
        ) from None
    return context


def admin_client(kafka: KafkaTarget, *, request_timeout_ms: int = 15000) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(**client_options(kafka), request_timeout_ms=request_timeout_ms)
