"""``orders contract export``: write the JSON Schema of every event type's current version to
``contracts/events`` (never over a published one that differs: that needs a new version)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from service.kernel import contract, envelope


def schema_text(schema: dict[str, object]) -> str:
    """A committed schema file's text: sorted keys, so that a change shows as a small diff."""
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


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
        path.write_text(schema_text(schema))
        written.append(path.name)
    print(
        f"{len(written)} schema(s) written to {folder}"
        + (f": {', '.join(written)}" if written else "")
    )
