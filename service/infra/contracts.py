"""The committed event contract on disk (``contracts/events/<Type>.v<N>.json``, one JSON Schema
per event type and schema version ever published) and the AsyncAPI document built from it."""

from __future__ import annotations

import json
import re
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

from service.infra.database import PROJECT_ROOT
from service.kernel import contract
from service.kernel.envelope import CURRENT_SCHEMA_VERSION

CONTRACTS = PROJECT_ROOT / "contracts" / "events"
ASYNCAPI = PROJECT_ROOT / "docs" / "events" / "asyncapi.json"


def key_of(path: Path) -> contract.Key | None:
    """``OrderPaid.v1.json`` -> ``("OrderPaid", 1)``; None for a file of another name."""
    match = re.fullmatch(r"(\w+)\.v(\d+)\.json", path.name)
    return (match[1], int(match[2])) if match else None


def published_schemas(folder: Path = CONTRACTS) -> dict[contract.Key, dict[str, Any]]:
    """The schemas committed in ``folder`` (none if it is missing)."""
    found = {}
    for path in sorted(folder.glob("*.json")):
        key = key_of(path)
        if key is not None:
            found[key] = json.loads(path.read_text())
    return found


def _service_version() -> str:
    try:
        return package_version("orders-service")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0.0.0"


def event_contract(topic: str, folder: Path = CONTRACTS) -> dict[str, Any]:
    """The AsyncAPI document of ``topic``: every published version (earlier versions as
    committed, the current ones as the msgspec types generate them today)."""
    schemas = {**published_schemas(folder), **contract.current_schemas(CURRENT_SCHEMA_VERSION)}
    return contract.asyncapi_document(topic, schemas, version=_service_version())


def document_text(document: dict[str, Any]) -> str:
    """A committed JSON document's text: sorted keys, so that a change shows as a small diff."""
    return json.dumps(document, indent=2, sort_keys=True) + "\n"
