"""A real Apache Kafka 4.x broker (KRaft, one broker+controller node) as a ``java`` process.

The jars come from Maven Central through ``mvn`` into a cache outside the repository, or from an
unpacked distribution named by ``KAFKA_HOME``. Kafka 4.4.0 is the newest 4.x on Maven Central;
aiokafka 0.14 still speaks the protocol versions every 4.x broker keeps (the removals of
KIP-896 only touched versions older than aiokafka's), and the integration tests prove it
against this exact broker.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.infra.embedded import (
    cache_dir,
    ensure_port_free,
    free_port,
    log_tail,
    spawn,
    stop_process,
)
from service.infra.embedded.certificates import ServerCertificate, server_certificate
from service.infra.kafka_clients import (
    KafkaTarget,
    admin_client,
    client_options,
    connection,
    handshake_problem,
)
from service.kernel.errors import EnvironmentProblem
from service.kernel.settings import KafkaConnection, KafkaSecurity

KAFKA_VERSION = "4.4.0"
# The broker's POM ships log4j-core but no SLF4J binding; without one it logs nothing at all.
# Kafka 4.4 still uses SLF4J 1.7, so the binding is log4j-slf4j-impl at Kafka's log4j2 version.
LOG4J_VERSION = "2.25.5"
MIN_JAVA = 17

# A secured broker (``LocalKafka(secured=True)``): who logs in how, and who may do anything.
SECURED_PROTOCOL = "SASL_SSL"
SCRAM_MECHANISM = "SCRAM-SHA-512"
SUPER_USER = "admin"  # the broker's own principal too
# What StorageTool's --add-scram can carry without quoting (it splits on "," and "]").
_SAFE_PASSWORD = re.compile(r"[A-Za-z0-9_.~-]{8,}")

_log = logging.getLogger(__name__)

_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.orders</groupId><artifactId>kafka-broker</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId>
      <version>{kafka}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId>
      <version>{log4j}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId>
      <version>{log4j}</version></dependency>
  </dependencies>
</project>
"""

LOG4J2_XML = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration status="WARN">
  <Appenders>
    <Console name="stdout" target="SYSTEM_OUT">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </Console>
  </Appenders>
  <Loggers>
    <Root level="WARN"><AppenderRef ref="stdout"/></Root>
    <Logger name="kafka.server.KafkaServer" level="INFO"/>
    <Logger name="kafka.server.KafkaRaftServer" level="INFO"/>
  </Loggers>
</Configuration>
"""


def java_executable() -> str:
    """The ``java`` to run the broker with (``$JAVA_HOME/bin/java`` first), checked to be 17+."""
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
    if not java or not Path(java).exists():
        raise EnvironmentProblem(
            "no java found: Kafka 4 needs Java 17 or newer; install it (apt-get install "
            "openjdk-17-jre-headless) or set JAVA_HOME, or point KAFKA_BOOTSTRAP_SERVERS at a "
            "broker"
        )
    result = subprocess.run([java, "-version"], capture_output=True, text=True, check=False)
    match = re.search(r'version "(\d+)(?:\.(\d+))?', result.stderr + result.stdout)
    if not match:
        raise EnvironmentProblem(f"could not read the version of {java}: {result.stderr.strip()}")
    major = int(match.group(1))
    if major == 1 and match.group(2):  # "1.8" style
        major = int(match.group(2))
    if major < MIN_JAVA:
        raise EnvironmentProblem(
            f"{java} is Java {major}, but Kafka 4 needs Java {MIN_JAVA} or newer: install a newer "
            "JDK and set JAVA_HOME to it"
        )
    return java


def broker_classpath() -> list[Path]:
    """The broker's jars: ``$KAFKA_HOME/libs`` when set, else resolved once with Maven."""
    kafka_home = os.environ.get("KAFKA_HOME")
    if kafka_home:
        libs = Path(kafka_home) / "libs"
        jars = sorted(libs.glob("*.jar"))
        if not jars:
            raise EnvironmentProblem(
                f"KAFKA_HOME={kafka_home} has no libs/*.jar: point it at an unpacked Apache Kafka "
                "distribution, or unset it to let Maven fetch the broker"
            )
        return jars
    pom = _POM.format(kafka=KAFKA_VERSION, log4j=LOG4J_VERSION)
    # Keyed on the whole POM, so a change of any version in it resolves anew.
    digest = hashlib.sha256(pom.encode()).hexdigest()[:12]
    target = cache_dir() / f"kafka-{KAFKA_VERSION}-{digest}"
    marker = target / "resolved"
    if not marker.exists():
        _resolve_with_maven(target, pom)
    return sorted((target / "lib").glob("*.jar"))


def _resolve_with_maven(target: Path, pom: str) -> None:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise EnvironmentProblem(
            "mvn not found: the Kafka broker is fetched from Maven Central with Maven; install it "
            "(apt-get install maven), or set KAFKA_HOME to an unpacked Kafka, or "
            "KAFKA_BOOTSTRAP_SERVERS to a running broker"
        )
    target.mkdir(parents=True, exist_ok=True)
    (target / "pom.xml").write_text(pom)
    _log.warning(
        "fetching Apache Kafka %s from Maven Central (once; cached in %s)", KAFKA_VERSION, target
    )
    started = time.monotonic()
    result = subprocess.run(
        [
            mvn,
            "-q",
            "-B",
            "-f",
            str(target / "pom.xml"),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={target / 'lib'}",
            "-DincludeScope=runtime",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        detail = (result.stdout + result.stderr).strip().splitlines()[-3:]
        raise EnvironmentProblem(
            f"Maven could not fetch Kafka {KAFKA_VERSION} (is Maven Central reachable?): "
            + " | ".join(detail)
            + " -- or set KAFKA_HOME to an unpacked Kafka distribution"
        )
    (target / "resolved").write_text(f"{time.monotonic() - started:.1f}s\n")


def new_cluster_id() -> str:
    """A cluster id in Kafka's own format: 16 random bytes, URL-safe base64, unpadded.

    One starting with "-" would be read as an option by StorageTool, so those are redrawn.
    """
    while True:
        candidate = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not candidate.startswith("-"):
            return candidate


def run_coroutine(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` on a fresh loop in a helper thread (safe even inside a running loop)."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = asyncio.run(coro)
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="kafka-probe")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


async def answers_metadata(bootstrap: KafkaTarget, *, timeout: float) -> None:
    """Ask the cluster for its brokers; raise unless it names at least one in time.

    Enough to know an external cluster answers, and it needs no right to create or write a
    topic, which a cluster may withhold (or allow only with more replicas than a probe knows).
    """
    admin = admin_client(bootstrap, request_timeout_ms=int(timeout * 1000))
    await admin.start()
    try:
        cluster = await asyncio.wait_for(admin.describe_cluster(), timeout)
    finally:
        await admin.close()
    if not cluster.get("brokers"):
        raise RuntimeError("the cluster's metadata names no broker")


async def round_trip(bootstrap: KafkaTarget, *, timeout: float) -> None:
    """Produce one record to a probe topic and consume it back; raise if that fails in time."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.admin import NewTopic
    from aiokafka.errors import TopicAlreadyExistsError, for_code

    topic = "__orders_probe"
    admin = admin_client(bootstrap, request_timeout_ms=int(timeout * 1000))
    await admin.start()
    try:
        created = await admin.create_topics(
            [NewTopic(topic, num_partitions=1, replication_factor=1)]
        )
    finally:
        await admin.close()
    # aiokafka returns a refused creation in the response rather than raising it.
    for topic_error in created.topic_errors:
        code = topic_error[1]
        if code not in (0, TopicAlreadyExistsError.errno):
            raise for_code(code)(f"creating the probe topic {topic}")
    producer = AIOKafkaProducer(
        **client_options(bootstrap), acks="all", request_timeout_ms=int(timeout * 1000)
    )
    await producer.start()
    try:
        marker = uuid.uuid4().bytes
        meta = await producer.send_and_wait(topic, marker)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(**client_options(bootstrap), enable_auto_commit=False)
    await consumer.start()
    try:
        partition = TopicPartition(topic, meta.partition)
        consumer.assign([partition])
        consumer.seek(partition, meta.offset)
        record = await asyncio.wait_for(consumer.getone(), timeout)
        if record.value != marker:
            raise RuntimeError("the probe read back a different record")
    finally:
        await consumer.stop()


def wait_until_usable(
    bootstrap: KafkaTarget,
    *,
    deadline: float,
    process: subprocess.Popen[bytes] | None,
    log_file: Path | None,
) -> None:
    """Poll (no fixed sleeps) until the broker is usable, or the deadline passes.

    A broker started here (``process`` given) must produce and consume a record: that proves
    it has finished starting. An external cluster (``process`` None) need only answer a
    metadata request: it may forbid the probe's topic, and its readiness is its operators' job;
    one that refuses this client's login or TLS handshake raises ``KafkaAccessRefused`` at once.
    """
    probe = round_trip if process is not None else answers_metadata
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log_tail(log_file) if log_file else ""
            raise EnvironmentProblem(
                f"the Kafka broker exited with code {process.returncode} while starting:\n{tail}"
            )
        if not accepts_connections(bootstrap, timeout=0):
            time.sleep(0.1)  # pacing between probes, not synchronisation
            continue
        try:
            run_coroutine(
                probe(bootstrap, timeout=max(1.0, min(10.0, deadline - time.monotonic())))
            )
            return
        except Exception as exc:  # not ready yet: try again until the deadline
            last_error = exc
            if process is None:
                # An external cluster that refuses this client's login or TLS will go on
                # refusing it: say why at once, not after the deadline.
                refusal = run_coroutine(handshake_problem(bootstrap))
                if refusal is not None:
                    raise refusal from None
            time.sleep(0.2)  # pacing between probes, not synchronisation
    what = "a produce and consume" if process is not None else "a metadata request"
    raise EnvironmentProblem(
        f"Kafka at {bootstrap} did not answer {what} in time ({last_error!r}); "
        "check that it runs and is reachable, or unset KAFKA_BOOTSTRAP_SERVERS to start one here"
    )


def accepts_connections(bootstrap: KafkaTarget, *, timeout: float = 1.0) -> bool:
    """Whether the first bootstrap server accepts TCP connections within ``timeout``."""
    host, _, port = connection(bootstrap).bootstrap_servers.split(",")[0].rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)  # pacing between connection attempts


@dataclass
class LocalKafka:
    """One KRaft node on 127.0.0.1 with a throw-away (or kept) data directory."""

    port: int = 0
    data_dir: Path | None = None
    heap: str = "768m"
    controller_port: int = 0
    # A broker as shipped (``auto.create.topics.enable=true``, 7-day retention by default):
    # what a user's own broker is, unless its operators changed that.
    stock: bool = False
    # Opt-in: the one client listener is SASL_SSL (SCRAM-SHA-512, a certificate made for this
    # broker), the StandardAuthorizer allows only what ACLs grant, and ``SUPER_USER`` may do
    # anything. ``users`` (name -> password) can log in besides it; all are made when the
    # storage is formatted.
    secured: bool = False
    users: Mapping[str, str] = field(default_factory=dict, repr=False)
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _owns_data_dir: bool = field(default=False, init=False)
    _super_user_password: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def certificate(self) -> ServerCertificate:
        """The broker's TLS files (secured only); clients verify it with ``ca_file``."""
        assert self.data_dir is not None
        assert self.secured
        return ServerCertificate(
            ca_file=self.data_dir / "tls" / "broker-ca.pem",
            certificate_file=self.data_dir / "tls" / "broker.pem",
            key_file=self.data_dir / "tls" / "broker-key.pem",
        )

    def connection_as(self, user: str = SUPER_USER) -> KafkaConnection:
        """How a client logs in as ``user`` (``SUPER_USER`` or one of ``users``)."""
        assert self.secured, "a PLAINTEXT broker has no users: use bootstrap_servers"
        password = self._super_user_password if user == SUPER_USER else self.users[user]
        return KafkaConnection(
            self.bootstrap_servers,
            KafkaSecurity(
                protocol=SECURED_PROTOCOL,
                sasl_mechanism=SCRAM_MECHANISM,
                sasl_username=user,
                sasl_password=password,
                ssl_cafile=str(self.certificate.ca_file),
            ),
        )

    @property
    def _probe_target(self) -> KafkaTarget:
        """How the broker's own probes connect: as the super user when secured."""
        return self.connection_as(SUPER_USER) if self.secured else self.bootstrap_servers

    @property
    def log_file(self) -> Path:
        assert self.data_dir is not None
        return self.data_dir / "broker.log"

    def start(self, *, timeout: float = 120.0) -> str:
        """Format storage if new, start the broker, and wait until it is usable.

        ``timeout`` bounds the broker's start only, not a first fetch of its jars with Maven.
        """
        java = java_executable()
        classpath = broker_classpath()
        deadline = time.monotonic() + timeout
        if self.port:
            ensure_port_free(self.port, "Kafka", "--kafka-port")
        else:
            self.port = free_port()
        self.controller_port = self.controller_port or free_port()
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="orders-kafka-"))
            self._owns_data_dir = True
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.secured:
            self._check_users()
            if not self.certificate.key_and_chain_file.exists():
                server_certificate(self.certificate.ca_file.parent, "broker")
            self._keep_super_user_password()
        properties = self.data_dir / "server.properties"
        properties.write_text(self._server_properties(self.controller_port))
        properties.chmod(0o600)  # it holds the super user's password when secured
        log4j = self.data_dir / "log4j2.xml"
        log4j.write_text(LOG4J2_XML)
        base = [
            java,
            "-Xms256m",
            f"-Xmx{self.heap}",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={log4j}",
            "-cp",
            os.pathsep.join(map(str, classpath)),
        ]
        logs = self.data_dir / "logs"
        if not (logs / "meta.properties").exists():
            formatted = subprocess.run(
                [
                    *base,
                    "kafka.tools.StorageTool",
                    "format",
                    "-t",
                    new_cluster_id(),
                    "-c",
                    str(properties),
                    "--ignore-formatted",
                    *self._scram_credentials(),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if formatted.returncode != 0:
                raise EnvironmentProblem(
                    f"formatting Kafka storage failed: {formatted.stderr.strip()[-500:]}"
                )
        self.process = spawn([*base, "kafka.Kafka", str(properties)], log_file=self.log_file)
        try:
            wait_until_usable(
                self._probe_target,
                deadline=deadline,
                process=self.process,
                log_file=self.log_file,
            )
        except BaseException:
            self.stop()
            raise
        return self.bootstrap_servers

    def _keep_super_user_password(self) -> None:
        """The super user's credential is made once, when the storage is formatted: a kept
        data directory keeps its password for the next ``LocalKafka`` on it."""
        assert self.data_dir is not None
        kept = self.certificate.ca_file.parent / "super-user-password"
        if kept.exists():
            self._super_user_password = kept.read_text()
        else:
            kept.touch(mode=0o600)
            kept.write_text(self._super_user_password)

    def _check_users(self) -> None:
        if SUPER_USER in self.users:
            raise ValueError(f"{SUPER_USER} is the broker's own user: choose another name")
        for name, password in self.users.items():
            if not _SAFE_PASSWORD.fullmatch(password) or "," in name or "]" in name:
                raise ValueError(
                    f"user {name}: passwords here are 8+ of A-Z a-z 0-9 _ . ~ - "
                    "(secrets.token_urlsafe makes one), names have no ',' or ']'"
                )

    def _scram_credentials(self) -> list[str]:
        """StorageTool arguments that give each user a SCRAM credential (secured only)."""
        if not self.secured:
            return []
        users = {SUPER_USER: self._super_user_password, **self.users}
        arguments = []
        for name, password in users.items():
            arguments += ["--add-scram", f"{SCRAM_MECHANISM}=[name={name},password={password}]"]
        return arguments

    def _listener_properties(self, controller_port: int) -> list[str]:
        controller = f"CONTROLLER://127.0.0.1:{controller_port}"
        if not self.secured:
            return [
                f"listeners=PLAINTEXT://127.0.0.1:{self.port},{controller}",
                f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
                "inter.broker.listener.name=PLAINTEXT",
                "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            ]
        tls = self.certificate
        listener = SECURED_PROTOCOL.lower()
        password = self._super_user_password
        return [
            f"listeners={SECURED_PROTOCOL}://127.0.0.1:{self.port},{controller}",
            f"advertised.listeners={SECURED_PROTOCOL}://127.0.0.1:{self.port}",
            f"inter.broker.listener.name={SECURED_PROTOCOL}",
            f"listener.security.protocol.map={SECURED_PROTOCOL}:{SECURED_PROTOCOL},"
            "CONTROLLER:SASL_PLAINTEXT",
            f"sasl.enabled.mechanisms={SCRAM_MECHANISM}",
            f"sasl.mechanism.inter.broker.protocol={SCRAM_MECHANISM}",
            # The broker talks to itself (transaction markers, for one) as the super user.
            f"listener.name.{listener}.{SCRAM_MECHANISM.lower()}.sasl.jaas.config="
            "org.apache.kafka.common.security.scram.ScramLoginModule required "
            f'username="{SUPER_USER}" password="{password}";',
            # ... and to its controller too: an anonymous principal there would need to be a
            # super user. SCRAM cannot serve a controller (its credentials live in the metadata
            # the controller serves), so that 127.0.0.1 listener uses PLAIN.
            "sasl.mechanism.controller.protocol=PLAIN",
            "listener.name.controller.sasl.enabled.mechanisms=PLAIN",
            "listener.name.controller.plain.sasl.jaas.config="
            "org.apache.kafka.common.security.plain.PlainLoginModule required "
            f'username="{SUPER_USER}" password="{password}" user_{SUPER_USER}="{password}";',
            "ssl.keystore.type=PEM",
            f"ssl.keystore.location={tls.key_and_chain_file}",
            "ssl.truststore.type=PEM",
            f"ssl.truststore.location={tls.ca_file}",
            "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            f"super.users=User:{SUPER_USER}",
            "allow.everyone.if.no.acl.found=false",
        ]

    def _server_properties(self, controller_port: int) -> str:
        assert self.data_dir is not None
        return "\n".join(
            [
                "process.roles=broker,controller",
                "node.id=1",
                f"controller.quorum.voters=1@127.0.0.1:{controller_port}",
                "controller.listener.names=CONTROLLER",
                *self._listener_properties(controller_port),
                f"log.dirs={self.data_dir / 'logs'}",
                # One broker: internal topics must not ask for replicas it cannot have, or
                # init_transactions hangs for about two minutes.
                "offsets.topic.replication.factor=1",
                "offsets.topic.num.partitions=8",
                "transaction.state.log.replication.factor=1",
                "transaction.state.log.min.isr=1",
                "transaction.state.log.num.partitions=8",
                "share.coordinator.state.topic.replication.factor=1",
                "share.coordinator.state.topic.min.isr=1",
                "group.initial.rebalance.delay.ms=0",
                *([] if self.stock else ["auto.create.topics.enable=false", "num.partitions=1"]),
                "",
            ]
        )

    def stop(self, *, grace_seconds: float = 20.0) -> None:
        """SIGTERM the broker (controlled shutdown), SIGKILL after the grace period."""
        self.terminate(grace_seconds=grace_seconds)
        if self._owns_data_dir and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL the broker at once (for fault tests); the data directory stays for a restart."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def terminate(self, *, grace_seconds: float = 20.0) -> None:
        """SIGTERM the broker (controlled shutdown), SIGKILL after the grace period; the data
        directory stays for a restart."""
        if self.process is not None:
            stop_process(self.process, grace_seconds=grace_seconds)

    def restart(self, *, timeout: float = 120.0) -> None:
        """Start again on the same port and data directory after a stop or kill."""
        self.terminate()
        port = self.port
        self.start(timeout=timeout)
        assert self.port == port


def external_bootstrap() -> str | None:
    """``KAFKA_BOOTSTRAP_SERVERS`` when set: use that cluster and start nothing."""
    value = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    return value or None
