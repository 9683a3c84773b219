"""The wire contract: envelopes of every event type, pinned by golden files."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from service.kernel import envelope
from service.kernel.access import Actor
from service.kernel.events import (
    EVENT_TYPES,
    DomainEvent,
    ItemAdded,
    ItemQuantityChanged,
    ItemRemoved,
    OrderCancelled,
    OrderCreated,
    OrderDelivered,
    OrderPaid,
    OrderPlaced,
    OrderShipped,
    ShippingAddress,
    ShippingAddressSet,
)

GOLDEN = Path(__file__).parent.parent / "golden" / "events"
AT = datetime(2026, 11, 28, 9, 30, 0, 123000, tzinfo=UTC)

# One example of every event type at its CURRENT schema version: today's encoding of it must
# equal the golden file of that version, and that file must decode to it.
ADDRESS = ShippingAddress(
    name="Ada Lovelace",
    lines=("12 St James's Square", "Flat 3"),
    city="London",
    postal_code="SW1Y 4JH",
    country="GB",
)
EXAMPLES: dict[str, DomainEvent] = {
    "OrderCreated": OrderCreated(customer_id="c-42", currency="EUR", shipping_address=ADDRESS),
    "ItemAdded": ItemAdded(sku="MUG-1", name="Mug", quantity=2, unit_price=1250),
    "ItemQuantityChanged": ItemQuantityChanged(sku="MUG-1", quantity=3),
    "ItemRemoved": ItemRemoved(sku="MUG-1"),
    "OrderPlaced": OrderPlaced(total=3750, item_count=1),
    "OrderPaid": OrderPaid(amount=3750, currency="EUR", payment_reference="psp-1"),
    "OrderShipped": OrderShipped(
        carrier="DHL",
        tracking_number="JD01",
        shipping_address=msgspec.structs.replace(ADDRESS, region="Greater London"),
    ),
    "OrderDelivered": OrderDelivered(),
    "OrderCancelled": OrderCancelled(reason="customer request", refunded_amount=3750),
    "ShippingAddressSet": ShippingAddressSet(shipping_address=ADDRESS),
}

# What the golden file of each OLD schema version decodes (upcasts) to today, by (type,
# version). When an event type evolves: keep its old golden files, add its new one, move its
# example above to the new version and record here what each old file now decodes to.
UPCAST_EXAMPLES: dict[tuple[str, int], DomainEvent] = {
    ("OrderCreated", 1): OrderCreated(customer_id="c-42", currency="EUR"),  # no address then
    ("OrderShipped", 1): OrderShipped(carrier="DHL", tracking_number="JD01"),
}

# The envelope's optional fields as JSON: what a golden file written before a field existed
# decodes to.
ENVELOPE_DEFAULTS: dict[str, Any] = json.loads(
    msgspec.json.encode(
        {
            field.encode_name: field.default
            for field in msgspec.structs.fields(envelope.Envelope)
            if field.default is not msgspec.NODEFAULT
        }
    )
)

# Every golden file ever written ("OrderPaid.v1.json"): they all stay and all must decode.
GOLDEN_FILES = sorted(GOLDEN.glob("*.json"))


def _canonical(document: Any) -> str:
    """JSON text with sorted keys: equal only if the JSON types match too (1250 vs 1250.0)."""
    if isinstance(document, bytes | str):
        document = json.loads(document)
    return json.dumps(document, sort_keys=True, indent=2)


def _type_and_version(golden_file: Path) -> tuple[str, int]:
    match = re.fullmatch(r"(\w+)\.v(\d+)\.json", golden_file.name)
    assert match is not None, f"{golden_file.name}: golden files are named Type.vN.json"
    return match[1], int(match[2])


def _current_golden_file(name: str) -> Path:
    return GOLDEN / f"{name}.v{envelope.CURRENT_SCHEMA_VERSION[name]}.json"


def _versions_read(name: str) -> set[int]:
    """The schema versions of ``name`` that ``envelope`` claims to read: current or upcast."""
    upcast = {version for (type_, version) in envelope.UPCASTERS if type_ == name}
    return {envelope.CURRENT_SCHEMA_VERSION[name], *upcast}


def _sealed(event: DomainEvent) -> envelope.Envelope:
    return envelope.seal(
        event,
        event_id="3b8f1e9e-6f6a-5d1c-9a53-2f8d1c0b7a11",
        order_id="order-1",
        version=7,
        occurred_at=AT,
        command_id="cmd-1",
        correlation_id="corr-1",
        causation_id="cmd-1",
        idempotency_key="key-1",
        request_hash="abc123",
    )


def test_every_event_type_has_an_example_at_its_current_version() -> None:
    assert set(EXAMPLES) == set(EVENT_TYPES) == set(envelope.CURRENT_SCHEMA_VERSION)


def test_every_schema_version_the_envelope_reads_has_a_golden_file() -> None:
    read = {(name, v) for name in envelope.CURRENT_SCHEMA_VERSION for v in _versions_read(name)}
    found = {_type_and_version(path) for path in GOLDEN_FILES}
    assert sorted(read - found) == [], "a golden file was removed: restore it from git history"


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_encoding_matches_the_golden_file_of_the_current_version(name: str) -> None:
    # An envelope field added since the file was written (e.g. actor) is at its default here.
    golden = {**ENVELOPE_DEFAULTS, **json.loads(_current_golden_file(name).read_bytes())}
    assert _canonical(envelope.encode(_sealed(EXAMPLES[name]))) == _canonical(golden)


def test_the_actor_travels_in_the_envelope() -> None:
    actor = Actor(sub="c-42", client_id="web-shop")
    sealed = msgspec.structs.replace(_sealed(EXAMPLES["OrderPlaced"]), actor=actor)
    encoded = envelope.encode(sealed)
    assert json.loads(encoded)["actor"] == {"sub": "c-42", "client_id": "web-shop"}
    assert envelope.decode(encoded)[0].actor == actor


@pytest.mark.parametrize("golden_file", GOLDEN_FILES, ids=lambda path: path.name)
def test_every_golden_file_decodes_to_the_expected_event(golden_file: Path) -> None:
    name, version = _type_and_version(golden_file)
    if version == envelope.CURRENT_SCHEMA_VERSION.get(name):
        expected = EXAMPLES[name]
    else:
        assert (name, version) in UPCAST_EXAMPLES, f"add what {golden_file.name} decodes to"
        expected = UPCAST_EXAMPLES[name, version]
    sealed, event = envelope.decode(golden_file.read_bytes())
    assert event == expected
    assert msgspec.json.encode(event) == msgspec.json.encode(expected)  # JSON types too
    held = {**ENVELOPE_DEFAULTS, **json.loads(golden_file.read_bytes())}
    assert _canonical(envelope.encode(sealed)) == _canonical(held)  # every envelope field


def test_the_data_carries_no_type_tag_of_its_own() -> None:
    encoded = json.loads(envelope.encode(_sealed(EXAMPLES["OrderPaid"])))
    assert encoded["type"] == "OrderPaid"
    assert _canonical(encoded["data"]) == _canonical(
        {"amount": 3750, "currency": "EUR", "payment_reference": "psp-1"}
    )


def test_headers_repeat_type_schema_version_and_correlation() -> None:
    assert envelope.headers(_sealed(EXAMPLES["OrderPlaced"])) == [
        ("type", b"OrderPlaced"),
        ("schema_version", b"1"),
        ("correlation_id", b"corr-1"),
    ]


def test_event_ids_are_deterministic_with_an_idempotency_key() -> None:
    assert envelope.event_id_for("k", "cmd-a", 0) == envelope.event_id_for("k", "cmd-b", 0)
    assert envelope.event_id_for("k", "cmd-a", 0) != envelope.event_id_for("k", "cmd-a", 1)
    assert envelope.event_id_for(None, "cmd-a", 0) != envelope.event_id_for(None, "cmd-b", 0)


def test_event_ids_are_built_as_they_always_were() -> None:
    # Literal vectors: a new namespace or seed would give a replayed command new event ids.
    assert envelope.event_id_for("key-1", "cmd-1", 0) == "278f82c0-b8b5-5289-85ab-54d86bf741c5"
    assert envelope.event_id_for(None, "cmd-1", 1) == "0bcbb2d0-195a-5c22-95f5-e3e3bc6da858"
    assert (
        envelope.caller_event_id("user-1", "key-1", "o-1", 2)
        == "84d391d9-6641-5764-983e-35db4b50a727"
    )


def test_a_known_callers_keys_are_its_own_in_event_ids() -> None:
    ids = {
        envelope.caller_event_id("user-1", "k", "o-1", 2),
        envelope.caller_event_id("user-2", "k", "o-1", 2),  # another caller's same key
        envelope.event_id_for("k", "cmd-a", 0),  # the same key without a known caller
    }
    assert len(ids) == 3
    # The parts cannot run into each other ("a:b" + "c" is not "a" + "b:c").
    assert envelope.caller_event_id("a:b", "c", "o", 1) != envelope.caller_event_id(
        "a", "b:c", "o", 1
    )


def test_a_known_callers_event_ids_are_deterministic_and_new_at_each_version() -> None:
    first = envelope.caller_event_id("user-1", "k", "o-1", 2)
    assert envelope.caller_event_id("user-1", "k", "o-1", 2) == first
    # The same key again after its receipt expired: decided anew, at another version.
    assert envelope.caller_event_id("user-1", "k", "o-1", 5) != first


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, "no value"),
        (b"not json", "not a valid envelope"),
        (b'{"event_id": "x"}', "not a valid envelope"),
    ],
)
def test_undecodable_records_raise_a_named_error(value: bytes | None, message: str) -> None:
    with pytest.raises(envelope.UndecodableEvent, match=message):
        envelope.decode(value)


def test_a_naive_occurred_at_is_undecodable() -> None:
    # UndecodableEvent is what the projector halts on (and parking and tail report).
    raw = json.loads(_current_golden_file("OrderPaid").read_text())
    raw["occurred_at"] = "2026-11-28T09:30:00.123"
    with pytest.raises(envelope.UndecodableEvent, match="timezone"):
        envelope.decode(json.dumps(raw).encode())


def test_an_occurred_at_with_an_offset_decodes_to_the_same_instant() -> None:
    raw = json.loads(_current_golden_file("OrderPaid").read_text())
    raw["occurred_at"] = "2026-11-28T07:30:00.123-02:00"
    sealed, _ = envelope.decode(json.dumps(raw).encode())
    assert sealed.occurred_at == AT


def test_an_unknown_type_is_undecodable() -> None:
    raw = json.loads((GOLDEN / "OrderDelivered.v1.json").read_text())
    raw["type"] = "OrderTeleported"
    with pytest.raises(envelope.UndecodableEvent, match="unknown event type"):
        envelope.decode(json.dumps(raw).encode())


def test_a_newer_schema_version_than_known_is_undecodable() -> None:
    raw = json.loads(_current_golden_file("OrderDelivered").read_text())
    raw["schema_version"] += 1
    with pytest.raises(envelope.UndecodableEvent, match="newer than this code knows"):
        envelope.decode(json.dumps(raw).encode())


def test_old_schema_versions_are_upcast_on_read(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pretend OrderShipped has moved on a version, and new tracking numbers carry a suffix.
    golden_file = _current_golden_file("OrderShipped")
    today = envelope.CURRENT_SCHEMA_VERSION["OrderShipped"]
    monkeypatch.setitem(envelope.CURRENT_SCHEMA_VERSION, "OrderShipped", today + 1)
    monkeypatch.setitem(
        envelope.UPCASTERS,
        ("OrderShipped", today),
        lambda data: {**data, "tracking_number": data["tracking_number"] + "-next"},
    )
    _, event = envelope.decode(golden_file.read_bytes())
    shipped = EXAMPLES["OrderShipped"]
    assert isinstance(shipped, OrderShipped)
    assert event == msgspec.structs.replace(
        shipped, tracking_number=f"{shipped.tracking_number}-next"
    )


def test_a_missing_upcaster_is_undecodable(monkeypatch: pytest.MonkeyPatch) -> None:
    golden_file = _current_golden_file("OrderShipped")
    today = envelope.CURRENT_SCHEMA_VERSION["OrderShipped"]
    monkeypatch.setitem(envelope.CURRENT_SCHEMA_VERSION, "OrderShipped", today + 1)
    with pytest.raises(envelope.UndecodableEvent, match=f"no upcaster for OrderShipped v{today}"):
        envelope.decode(golden_file.read_bytes())
