"""`orders dev` from the outside: it brings all up, serves, and stops all it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from service.infra.embedded import free_port


def _wait_for(url: str, process: subprocess.Popen[str], deadline: float) -> httpx.Response:
    while time.monotonic() < deadline:
        assert process.poll() is None, f"orders dev exited early:\n{process.stdout.read()}"  # type: ignore[union-attr]
        try:
            return httpx.get(url, timeout=2)
        except httpx.TransportError:
            time.sleep(0.2)  # pacing between polls of a server that is starting
    raise AssertionError(f"{url} did not answer in time")


ORDERS = [sys.executable, "-m", "service.edge.cli.main"]


def _mint(data_dir: Path, sub: str, scope: str) -> str:
    """`orders token`, as a user runs it beside `orders dev`."""
    minted = subprocess.run(
        [*ORDERS, "token", "--data-dir", str(data_dir), "--sub", sub, "--scope", scope],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return minted.stdout.strip()


def test_orders_dev_serves_commands_and_queries_and_stops_everything_on_sigterm(
    tmp_path: Path,
) -> None:
    port = free_port()
    env = {
        k: v for k, v in os.environ.items() if k not in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL")
    }
    process = subprocess.Popen(
        [*ORDERS, "dev", "--port", str(port), "--data-dir", str(tmp_path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    children: list[psutil.Process] = []
    try:
        base = f"http://127.0.0.1:{port}"
        assert _wait_for(f"{base}/health", process, time.monotonic() + 180).status_code == 200
        children = psutil.Process(process.pid).children(recursive=True)
        names = " ".join(" ".join(child.cmdline()) for child in children)
        assert "kafka.Kafka" in names
        assert "postgres" in names

        deadline = time.monotonic() + 60
        while httpx.get(f"{base}/health/ready").status_code != 200:
            assert time.monotonic() < deadline, "the writer never became ready"
            time.sleep(0.1)  # pacing between readiness polls
        anonymous = httpx.post(f"{base}/orders", json={"customer_id": "c-1", "currency": "EUR"})
        assert anonymous.status_code == 401
        customer = {"Authorization": "Bearer " + _mint(tmp_path, "c-1", "orders:read orders:write")}
        created = httpx.post(
            f"{base}/orders",
            json={"customer_id": "c-1", "currency": "EUR"},
            headers={**customer, "Idempotency-Key": "first-order"},
        )
        assert created.status_code == 201, created.text
        order = httpx.get(
            base + created.headers["location"],
            headers={**customer, "X-Consistency-Token": created.headers["x-consistency-token"]},
            timeout=10,
        )
        assert order.status_code == 200, order.text
        assert order.json()["customer_id"] == "c-1"
        # The composition root tells the read side how many partitions the topic has.
        foreign = httpx.get(
            base + created.headers["location"],
            headers={**customer, "X-Consistency-Token": "999999:0"},
            timeout=10,
        )
        assert foreign.status_code == 400, foreign.text
        # The development issuer's keys are published; the key stays for the next run.
        keys = httpx.get(f"{base}/.well-known/jwks.json").json()["keys"]
        assert [key["alg"] for key in keys] == ["ES256"]
        assert (tmp_path / "identity" / "token-signing-key.pem").stat().st_mode & 0o077 == 0
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
    assert process.returncode == 0, output
    assert "Kafka" in output
    assert "API" in output
    assert "back office" in output  # the ready-to-use tokens
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, f"left behind: {[p.cmdline() for p in alive]}"
