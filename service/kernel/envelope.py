"""The event envelope: the contract on the wire (Kafka record value + headers).

One JSON object per record::

    {"event_id", "type", "schema_version", "order_id", "version", "occurred_at",
     "command_id", "correlation_id", "causation_id", "idempotency_key", "request_hash", "actor",
     "data"}

``type`` is the stable tag of the domain event and ``data`` its fields. Record headers repeat
``type``, ``schema_version`` and ``correlation_id`` so tools can route without decoding. Old
schema versions are upcast on read by explicit functions in ``UPCASTERS``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, cast

import msgspec

from service.kernel.access import Actor
from service.kernel.errors import BadEvent
from service.kernel.events import EVENT_TYPES, DomainEvent, event_type

# The schema version written today, per event type. Bump it (and add an upcaster from the old
# version, a golden file, and publish it with `orders contract export`) when an event's data
# changes shape; never rename a type. The rules: docs/events.md.
CURRENT_SCHEMA_VERSION: dict[str, int] = {
    **dict.fromkeys(EVENT_TYPES, 1),
    "OrderCreated": 2,  # v2: shipping_address (optional)
    "OrderShipped": 2,  # v2: shipping_address, where it was shipped to (optional)
}


def _without_shipping_address(data: dict[str, Any]) -> dict[str, Any]:
    """v1 of OrderCreated and OrderShipped -> v2: written before orders had addresses."""
    return {**data, "shipping_address": None}


# (type, from_version) -> function turning data of that version into data of version + 1.
UPCASTERS: dict[tuple[str, int], Callable[[dict[str, Any]], dict[str, Any]]] = {
    ("OrderCreated", 1): _without_shipping_address,
    ("OrderShipped", 1): _without_shipping_address,
}

_EVENT_ID_NAMESPACE = uuid.UUID("6f1c2d8e-35a7-4c55-9d1e-0b9a3c7e5f21")
_CALLER_EVENT_ID_NAMESPACE = uuid.UUID("b3e0c5a4-7d2f-4e61-8a9b-2c4d6e8f0a13")


class Envelope(msgspec.Struct, frozen=True, kw_only=True, gc=False):  # scalars only: no cycles
    event_id: str
    type: str
    schema_version: int
    order_id: str
    version: int
    # Timezone-aware, or the record is undecodable: a naive time has no UTC day to count in.
    occurred_at: Annotated[datetime, msgspec.Meta(tz=True)]
    command_id: str
    correlation_id: str
    causation_id: str | None = None
    # The client's Idempotency-Key and a hash of its request (both None without a key):
    # deduplication state lives in the log, so it survives restarts.
    idempotency_key: str | None = None
    request_hash: str | None = None
    # Who sent the command (the access token's subject and client); None when authentication
    # was off, and in events written before callers were recorded.
    actor: Actor | None = None
    data: msgspec.Raw  # the event's fields, as JSON (decode_data)


class UndecodableEvent(BadEvent):
    """A record that is not a valid envelope of a known event type and schema version."""


_encoder = msgspec.json.Encoder()
_envelope_decoder = msgspec.json.Decoder(Envelope)
_data_decoders: dict[str, msgspec.json.Decoder[Any]] = {
    name: msgspec.json.Decoder(cls) for name, cls in EVENT_TYPES.items()
}


def event_id_for(idempotency_key: str | None, command_id: str, index: int) -> str:
    """The id of the ``index``-th event of a command without a key, or with a key but no known
    caller (authentication off): deterministic with an idempotency key, so a command decided
    again has the same ids. Built as it always was (``caller_event_id`` is for known callers)."""
    seed = f"{idempotency_key or command_id}:{index}"
    return str(uuid.uuid5(_EVENT_ID_NAMESPACE, seed))


def caller_event_id(caller: str, idempotency_key: str, order_id: str, version: int) -> str:
    """The id of an event of a command with an idempotency key from a known caller (``Actor.sub``).

    Deterministic: the same decision (the same caller, key, order and version) has the same id.
    Each caller's keys are its own, so two callers' same key give different ids; and an
    order's version is never written twice, so a key used again once its receipt has expired
    (a new request) gives new ids too."""
    seed = _encoder.encode([caller, idempotency_key, order_id, version]).decode()
    return str(uuid.uuid5(_CALLER_EVENT_ID_NAMESPACE, seed))


def seal(event: DomainEvent, **fields: Any) -> Envelope:
    """Wrap a domain event in an envelope; ``fields`` are the envelope's other fields."""
    name = event_type(event)
    data = msgspec.to_builtins(event)
    data.pop("type", None)
    return Envelope(
        type=name,
        schema_version=CURRENT_SCHEMA_VERSION[name],
        data=msgspec.Raw(_encoder.encode(data)),
        **fields,
    )


def encode(envelope: Envelope) -> bytes:
    return _encoder.encode(envelope)


def headers(envelope: Envelope) -> list[tuple[str, bytes]]:
    return [
        ("type", envelope.type.encode()),
        ("schema_version", str(envelope.schema_version).encode()),
        ("correlation_id", envelope.correlation_id.encode()),
    ]


def decode(value: bytes | None) -> tuple[Envelope, DomainEvent]:
    """Decode a record value into its envelope and domain event, upcasting old versions."""
    if value is None:
        raise UndecodableEvent("record has no value")
    try:
        envelope = _envelope_decoder.decode(value)
    except msgspec.DecodeError as exc:
        raise UndecodableEvent(f"not a valid envelope: {exc}") from exc
    return envelope, decode_data(envelope)


def decode_data(envelope: Envelope) -> DomainEvent:
    current = CURRENT_SCHEMA_VERSION.get(envelope.type)
    if current is None:
        raise UndecodableEvent(f"unknown event type {envelope.type!r}")
    try:
        if envelope.schema_version == current:
            event: DomainEvent = _data_decoders[envelope.type].decode(envelope.data)
            return event
        if envelope.schema_version > current:
            raise UndecodableEvent(
                f"{envelope.type} schema version {envelope.schema_version} is newer than this "
                f"code knows ({current}): upgrade the service"
            )
        data = msgspec.json.decode(envelope.data)
        for version in range(envelope.schema_version, current):
            upcast = UPCASTERS.get((envelope.type, version))
            if upcast is None:
                raise UndecodableEvent(f"no upcaster for {envelope.type} v{version}")
            try:
                data = upcast(data)
            except Exception as exc:  # an upcaster's bug halts like any undecodable event
                raise UndecodableEvent(
                    f"upcasting {envelope.type} v{version} failed: {type(exc).__name__}: {exc}"
                ) from exc
        return cast(DomainEvent, msgspec.convert(data, EVENT_TYPES[envelope.type]))
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise UndecodableEvent(f"{envelope.type} data does not decode: {exc}") from exc
