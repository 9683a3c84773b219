"""The ``orders`` CLI of this checkout, run as a real subprocess."""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[2]
CLI_TIMEOUT_S = 90.0


@dataclass
class OrdersCli:
    """``python -m service.edge.cli.main ...`` against one broker, database and topic."""

    bootstrap: str
    database_url: str
    topic: str
    group_prefix: str | None = None  # ORDERS_GROUP_PREFIX: the projector groups it looks at
    environment: dict[str, str] = field(default_factory=dict)  # more variables, set last

    async def run(self, *args: str) -> tuple[int, str, str]:
        """Exit code, stdout and stderr of ``orders ARGS``."""
        env = dict(os.environ)
        env.update(
            KAFKA_BOOTSTRAP_SERVERS=self.bootstrap,
            DATABASE_URL=self.database_url,
            ORDERS_TOPIC=self.topic,
        )
        if self.group_prefix is not None:
            env["ORDERS_GROUP_PREFIX"] = self.group_prefix
        env.update(self.environment)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "service.edge.cli.main",
            *args,
            cwd=PROJECT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(process.communicate(), CLI_TIMEOUT_S)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()
