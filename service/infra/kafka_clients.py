"""The options every Kafka client of the service is made with: where the brokers are and how
to authenticate and encrypt (``KafkaSecurity``), in one place, so no client is left plain."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.conn import create_conn
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)
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
    requests inside its clients, so the default of the request class is changed, the first
    time a client of the service is made (``client_options``)."""
    original = MetadataRequest.__init__
    if getattr(original, "refuses_auto_creation", False):
        return

    def without_auto_creation(
        self: MetadataRequest,
        topics: list[str] | None = None,
        allow_auto_topic_creation: bool | None = None,
    ) -> None:
        original(self, topics, bool(allow_auto_topic_creation))

    without_auto_creation.refuses_auto_creation = True  # type: ignore[attr-defined]
    MetadataRequest.__init__ = without_auto_creation


def connection(kafka: KafkaTarget) -> KafkaConnection:
    return kafka if isinstance(kafka, KafkaConnection) else KafkaConnection(kafka)


def client_options(kafka: KafkaTarget) -> dict[str, Any]:
    """Keyword arguments for any aiokafka client (producer, consumer, admin)."""
    _never_ask_for_auto_creation()
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


class KafkaAccessRefused(EnvironmentProblem):
    """The brokers answer, but refuse this client's login or TLS handshake: no retry helps."""


async def handshake_problem(
    kafka: KafkaTarget, *, timeout: float = 10.0
) -> KafkaAccessRefused | None:
    """Why the first bootstrap server refuses this client's TLS handshake or SASL login, or
    None when it accepts both (or cannot be reached: that is not a refusal).

    aiokafka's clients log the cause of a failed bootstrap and raise only "Unable to
    bootstrap"; one connection made here, as they make it, shows the cause itself.
    """
    target = connection(kafka)
    security = target.security
    host, _, port = target.bootstrap_servers.split(",")[0].strip().rpartition(":")
    options = client_options(target)
    del options["bootstrap_servers"]
    where = f"Kafka at {target.bootstrap_servers}"
    try:
        opened = await asyncio.wait_for(
            create_conn(host, int(port), request_timeout_ms=int(timeout * 1000), **options),
            timeout,
        )
    except SaslAuthenticationFailed:
        return KafkaAccessRefused(
            f"{where} refused the login of user {security.sasl_username} (SASL "
            f"{security.sasl_mechanism}): check KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD "
            "(or KAFKA_SASL_PASSWORD_FILE)"
        )
    except UnsupportedSaslMechanismError:
        return KafkaAccessRefused(
            f"{where} does not accept SASL {security.sasl_mechanism} on this listener: set "
            "KAFKA_SASL_MECHANISM to one it offers (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)"
        )
    except ssl.SSLCertVerificationError as error:
        return KafkaAccessRefused(
            f"{where} presented a TLS certificate this client does not trust "
            f"({error.verify_message}): set KAFKA_SSL_CAFILE to the CA that signed the "
            "brokers' certificates (unset: the system's CAs), and check the host name in "
            "KAFKA_BOOTSTRAP_SERVERS is one the certificate names"
        )
    except ssl.SSLError as error:
        return KafkaAccessRefused(
            f"the TLS handshake with {where} failed ({error.reason or error}): check that "
            f"its listener speaks {security.protocol} (KAFKA_SECURITY_PROTOCOL), and "
            "KAFKA_SSL_CERTFILE/KAFKA_SSL_KEYFILE if it asks for a client certificate"
        )
    except (KafkaConnectionError, ConnectionResetError) as error:
        # Accepted, then dropped at what the client sent first (a TLS hello, a SASL handshake,
        # a plain request): not the refused connection of a server that is away.
        return KafkaAccessRefused(
            f"{where} hung up on a {security.protocol} client ({str(error) or type(error).__name__}"
            "): its listener probably expects another protocol; set KAFKA_SECURITY_PROTOCOL "
            "(and KAFKA_SASL_*, KAFKA_SSL_*) to what it expects"
        )
    except KafkaError as error:  # IllegalSaslState: a SASL login where none is expected
        return KafkaAccessRefused(
            f"{where} refused the handshake of a {security.protocol} client "
            f"({type(error).__name__}): its "
            "listener probably expects another protocol; set KAFKA_SECURITY_PROTOCOL (and "
            "KAFKA_SASL_*, KAFKA_SSL_*) to what it expects"
        )
    except (OSError, TimeoutError):
        return None  # not reachable, or too slow: the caller says it does not answer
    opened.close()
    return None
