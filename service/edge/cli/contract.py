"""``orders contract export``: write the JSON Schema of every event type's current version to
``contracts/events`` (never over a published one that differs: that needs a new version), and
the AsyncAPI document of the topic, built from every published version, to ``docs/events``."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from service.infra.contracts import document_text, event_contract
from service.kernel import contract, envelope
from service.kernel.settings import DEFAULT_TOPIC


def cmd_contract_export(args: argparse.Namespace) -> None:
    folder: Path = args.to
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for key, schema in contract.current_schemas(envelope.CURRENT_SCHEMA_VERSION).items():
        path = folder / contract.file_name(key)
        if path.exists():
            if json.loads(path.read_text()) != schema:
                raise SystemExit(f"orders: {contract.changed_shape(key)}")
            continue
        path.write_text(document_text(schema))
        written.append(path.name)
    print(
        f"{len(written)} schema(s) written to {folder}"
        + (f": {', '.join(written)}" if written else "")
    )
    asyncapi: Path = args.asyncapi
    asyncapi.parent.mkdir(parents=True, exist_ok=True)
    document = event_contract(os.environ.get("ORDERS_TOPIC") or DEFAULT_TOPIC, folder)
    asyncapi.write_text(document_text(document))
    print(f"AsyncAPI document written to {asyncapi}")
