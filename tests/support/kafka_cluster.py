"""Three real Kafka nodes (KRaft, each broker and controller) on 127.0.0.1: a cluster large
enough for the durability rules (three copies, two in sync) to apply."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from service.infra.embedded import free_port, spawn, stop_process
from service.infra.embedded.kafka import (
    LOG4J2_XML,
    broker_classpath,
    java_executable,
    new_cluster_id,
    wait_until_usable,
)

NODES = 3


@dataclass
class KafkaCluster:
    nodes: int = NODES
    heap: str = "384m"
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="orders-cluster-")))
    ports: list[int] = field(default_factory=list)
    controller_ports: list[int] = field(default_factory=list)
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def bootstrap_servers(self) -> str:
        return ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def start(self, *, timeout: float = 180.0) -> str:
        deadline = time.monotonic() + timeout
        java, classpath = java_executable(), broker_classpath()
        self.ports = [free_port() for _ in range(self.nodes)]
        self.controller_ports = [free_port() for _ in range(self.nodes)]
        voters = ",".join(
            f"{n + 1}@127.0.0.1:{port}" for n, port in enumerate(self.controller_ports)
        )
        cluster_id = new_cluster_id()
        log4j = self.root / "log4j2.xml"
        log4j.write_text(LOG4J2_XML)
        base = [
            java,
            "-Xms128m",
            f"-Xmx{self.heap}",
            f"-Dlog4j2.configurationFile={log4j}",
            "-cp",
            os.pathsep.join(map(str, classpath)),
        ]
        for n in range(self.nodes):
            properties = self._properties(n, voters)
            formatted = subprocess.run(
                [*base, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", properties],
                capture_output=True,
                text=True,
                check=False,
            )
            assert formatted.returncode == 0, formatted.stderr[-500:]
        for n in range(self.nodes):
            node = self.root / f"node-{n + 1}"
            self.processes.append(
                spawn(
                    [*base, "kafka.Kafka", str(node / "server.properties")],
                    log_file=node / "broker.log",
                )
            )
        try:
            for port in self.ports:
                wait_until_usable(
                    f"127.0.0.1:{port}", deadline=deadline, process=None, log_file=None
                )
        except BaseException:
            self.stop()
            raise
        return self.bootstrap_servers

    def _properties(self, n: int, voters: str) -> str:
        node = self.root / f"node-{n + 1}"
        node.mkdir(parents=True, exist_ok=True)
        port, controller = self.ports[n], self.controller_ports[n]
        (node / "server.properties").write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    f"node.id={n + 1}",
                    f"controller.quorum.voters={voters}",
                    f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}",
                    f"advertised.listeners=PLAINTEXT://127.0.0.1:{port}",
                    "controller.listener.names=CONTROLLER",
                    "inter.broker.listener.name=PLAINTEXT",
                    "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                    f"log.dirs={node / 'logs'}",
                    "offsets.topic.num.partitions=4",
                    "transaction.state.log.num.partitions=4",
                    "group.initial.rebalance.delay.ms=0",
                    "auto.create.topics.enable=false",
                    "",
                ]
            )
        )
        return str(node / "server.properties")

    def stop(self) -> None:
        for process in self.processes:
            stop_process(process, grace_seconds=20)
        self.processes.clear()
        shutil.rmtree(self.root, ignore_errors=True)
