"""The published event contract: the JSON Schema of each event type's ``data`` at each schema
version ever written, generated from the msgspec types (never written by hand), the rules that
keep it (a published version never changes; a new one comes with an upcaster from the one
before and a golden file), and the AsyncAPI document that states it all for consumers.

Pure: the caller reads the committed schemas (``contracts/events/<Type>.v<N>.json``) and the
golden files, and this says what breaks the rules.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Set
from typing import Any

import msgspec

from service.kernel.envelope import Envelope
from service.kernel.events import EVENT_TYPES, Event

Key = tuple[str, int]  # (event type, schema version)

ASYNCAPI_VERSION = "3.0.0"
KAFKA_BINDING_VERSION = "0.5.0"


def file_name(key: Key) -> str:
    return f"{key[0]}.v{key[1]}.json"


def changed_shape(key: Key) -> str:
    """What to do when the schema of a published version ``key`` would change."""
    name, version = key
    return (
        f"the data of {name} v{version} changed shape, but v{version} is published and events "
        f"of it are in the log: keep v{version}, and add version {version + 1} instead "
        f"(CURRENT_SCHEMA_VERSION), an upcaster from v{version} (UPCASTERS in "
        "service/kernel/envelope.py) and a golden file "
        f"tests/golden/events/{file_name((name, version + 1))}, then run "
        "`orders contract export`"
    )


def data_schema(cls: type[Event]) -> dict[str, Any]:
    """The JSON Schema of an event type's ``data`` as stored: its fields without the type tag,
    which the envelope carries (``type``) instead."""
    schema = msgspec.json.schema(cls)
    body = schema["$defs"][cls.__name__]
    body["properties"].pop("type")
    body["required"].remove("type")
    if not body["required"]:
        del body["required"]
    return schema


def current_schemas(current: Mapping[str, int]) -> dict[Key, dict[str, Any]]:
    """The schema of each event type's data at its current version, from its msgspec type."""
    return {(name, current[name]): data_schema(cls) for name, cls in EVENT_TYPES.items()}


def contract_problems(
    generated: Mapping[Key, dict[str, Any]],
    published: Mapping[Key, dict[str, Any]],
    *,
    upcasters: Set[Key],
    goldens: Set[Key],
) -> list[str]:
    """What breaks the contract; empty when it holds.

    ``generated``: today's schema per (type, current version); ``published``: the committed
    ones; ``upcasters``: (type, from version) pairs with an upcaster; ``goldens``: (type,
    version) pairs with a golden file.
    """
    problems = []
    for (name, version), schema in sorted(generated.items()):
        committed = published.get((name, version))
        if committed is None:
            problems.append(
                f"{name} v{version} is not published: run `orders contract export` and commit "
                f"contracts/events/{file_name((name, version))}"
            )
        elif committed != schema:
            problems.append(changed_shape((name, version)))
        for earlier in range(1, version):
            if (name, earlier) not in published:
                problems.append(
                    f"{name} v{earlier} was published and is gone: restore "
                    f"contracts/events/{file_name((name, earlier))} from git history"
                )
    for name, version in sorted(published):
        if version > 1 and (name, version - 1) not in upcasters:
            problems.append(
                f"{name} v{version} has no upcaster from v{version - 1}: add one to UPCASTERS "
                "in service/kernel/envelope.py (events of every version stay in the log)"
            )
        if (name, version) not in goldens:
            problems.append(
                f"{name} v{version} has no golden file: add "
                f"tests/golden/events/{file_name((name, version))}"
            )
    return problems


def _component(key: Key) -> str:
    return f"{key[0]}.v{key[1]}"


def _moved(schema: Any, names: Mapping[str, str]) -> Any:
    """``schema`` with each ``#/$defs/X`` reference pointing at the component ``names[X]``."""
    if isinstance(schema, dict):
        return {
            k: f"#/components/schemas/{names[v.removeprefix('#/$defs/')]}"
            if k == "$ref" and isinstance(v, str) and v.startswith("#/$defs/")
            else _moved(v, names)
            for k, v in schema.items()
        }
    if isinstance(schema, list):
        return [_moved(item, names) for item in schema]
    return schema


_HEADERS: dict[str, Any] = {
    "type": "object",
    "description": "Kafka record headers (UTF-8 strings), so that a consumer can route or skip "
    "a record without decoding its value",
    "properties": {
        "type": {"type": "string", "description": "The event type: the envelope's `type`"},
        "schema_version": {
            "type": "string",
            "pattern": "^[0-9]+$",
            "description": "The schema version of the event's data: the envelope's "
            "`schema_version`, in decimal",
        },
        "correlation_id": {
            "type": "string",
            "description": "The request the command came from (the envelope's "
            "`correlation_id`): every event of one request has it",
        },
        "traceparent": {
            "type": "string",
            "description": "W3C Trace Context of the command's producer span; only on records "
            "of sampled (traced) commands",
        },
        "tracestate": {"type": "string", "description": "W3C Trace Context vendor state"},
    },
    "required": ["type", "schema_version", "correlation_id"],
}


def asyncapi_document(
    topic: str, schemas: Mapping[Key, dict[str, Any]], *, version: str
) -> dict[str, Any]:
    """The AsyncAPI 3 document of the events topic: one message per event type and schema
    version in ``schemas`` (the data schemas as published), each an envelope of that type and
    version whose ``data`` has that schema."""
    components: dict[str, Any] = {"Headers": _HEADERS}
    refs, envelope_schemas = msgspec.json.schema_components(
        [Envelope], ref_template="#/components/schemas/{name}"
    )
    components.update(envelope_schemas)
    messages: dict[str, Any] = {}
    for key, schema in sorted(schemas.items()):
        name, schema_version = key
        main = re.fullmatch(r"#/\$defs/(\w+)", schema["$ref"])
        assert main is not None, f"{file_name(key)} does not refer to its type"
        names = {
            definition: _component(key)
            if definition == main[1]
            else f"{_component(key)}.{definition}"
            for definition in schema["$defs"]
        }
        for definition, body in schema["$defs"].items():
            components[names[definition]] = _moved(body, names)
        messages[_component(key)] = {
            "name": name,
            "title": f"{name} v{schema_version}",
            "contentType": "application/json",
            "headers": {"$ref": "#/components/schemas/Headers"},
            "correlationId": {"location": "$message.header#/correlation_id"},
            "payload": {
                "allOf": [
                    refs[0],
                    {
                        "type": "object",
                        "properties": {
                            "type": {"const": name},
                            "schema_version": {"const": schema_version},
                            "data": {"$ref": f"#/components/schemas/{_component(key)}"},
                        },
                    },
                ]
            },
            "bindings": {
                "kafka": {
                    "key": {
                        "type": "string",
                        "description": "The order id: every event of an order is in one "
                        "partition, in the order of its versions",
                    },
                    "bindingVersion": KAFKA_BINDING_VERSION,
                }
            },
        }
    channel_messages = {
        message: {"$ref": f"#/components/messages/{message}"} for message in messages
    }
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "Order events",
            "version": version,
            "description": "Every change of every order, as events appended to one Kafka "
            "topic in Kafka transactions (read it read_committed). A record's value is a JSON "
            "envelope; its `data` has the schema of its `type` and `schema_version`. Versions "
            "of a type only ever add: see docs/events.md for the compatibility rules.",
        },
        "defaultContentType": "application/json",
        "channels": {
            "orderEvents": {
                "address": topic,
                "title": "The order event log",
                "messages": channel_messages,
                "bindings": {"kafka": {"topic": topic, "bindingVersion": KAFKA_BINDING_VERSION}},
            }
        },
        "operations": {
            "receiveOrderEvents": {
                "action": "receive",
                "channel": {"$ref": "#/channels/orderEvents"},
                "summary": "Read the order events (isolation.level=read_committed)",
                "messages": [
                    {"$ref": f"#/channels/orderEvents/messages/{message}"} for message in messages
                ],
            }
        },
        "components": {"schemas": components, "messages": messages},
    }
