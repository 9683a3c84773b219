"""The wire contract: envelopes of every event type, pinned by golden files."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from service import domain, envelope

GOLDEN = Path(__file__).parent.parent / "golden" / "events"
AT = datetime(2026, 11, 28, 9, 30, 0, 123000, tzinfo=UTC)

# One example of every event type ever written, with schema version 1.
EXAMPLES: dict[str, domain.DomainEvent] = {
    "OrderCreated": domain.OrderCreated(customer_id="c-42", currency="EUR"),
    "ItemAdded": domain.ItemAdded(sku="MUG-1", name="Mug", quantity=2, unit_price=1250),
    "ItemQuantityChanged": domain.ItemQuantityChanged(sku="MUG-1", quantity=3),
    "ItemRemoved": domain.ItemRemoved(sku="MUG-1"),
    "OrderPlaced": domain.OrderPlaced(total=3750, item_count=1),
    "OrderPaid": domain.OrderPaid(amount=3750, currency="EUR", payment_reference="psp-1"),
    "OrderShipped": domain.OrderShipped(carrier="DHL", tracking_number="JD01"),
    "OrderDelivered": domain.OrderDelivered(),
    "OrderCancelled": domain.OrderCancelled(reason="customer request", refunded_amount=3750),
}


def _canonical(document: Any) -> str:
    """JSON text with sorted keys: equal only if the JSON types match too (1250 vs 1250.0)."""
    if isinstance(document, bytes | str):
        document = json.loads(document)
    return json.dumps(document, sort_keys=True, indent=2)


def _sealed(event: domain.DomainEvent) -> envelope.Envelope:
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


def test_every_event_type_has_an_example_and_a_golden_file() -> None:
    assert set(EXAMPLES) == set(domain.EVENT_TYPES)
    assert {path.name for path in GOLDEN.glob("*.json")} == {
        f"{name}.v1.json" for name in domain.EVENT_TYPES
    }


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_encoding_matches_the_golden_file(name: str) -> None:
    golden = (GOLDEN / f"{name}.v1.json").read_bytes()
    assert _canonical(envelope.encode(_sealed(EXAMPLES[name]))) == _canonical(golden)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_golden_files_decode_to_the_same_event(name: str) -> None:
    sealed, event = envelope.decode((GOLDEN / f"{name}.v1.json").read_bytes())
    assert event == EXAMPLES[name]
    assert sealed.type == name
    assert sealed.occurred_at == AT


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


def test_an_unknown_type_is_undecodable() -> None:
    raw = json.loads((GOLDEN / "OrderDelivered.v1.json").read_text())
    raw["type"] = "OrderTeleported"
    with pytest.raises(envelope.UndecodableEvent, match="unknown event type"):
        envelope.decode(json.dumps(raw).encode())


def test_a_newer_schema_version_than_known_is_undecodable() -> None:
    raw = json.loads((GOLDEN / "OrderDelivered.v1.json").read_text())
    raw["schema_version"] = 2
    with pytest.raises(envelope.UndecodableEvent, match="newer than this code knows"):
        envelope.decode(json.dumps(raw).encode())


def test_old_schema_versions_are_upcast_on_read(monkeypatch: pytest.MonkeyPatch) -> None:
    # Pretend OrderShipped is at v2 now, and v2 tracking numbers carry a suffix.
    monkeypatch.setitem(envelope.CURRENT_SCHEMA_VERSION, "OrderShipped", 2)
    monkeypatch.setitem(
        envelope.UPCASTERS,
        ("OrderShipped", 1),
        lambda data: {**data, "tracking_number": data["tracking_number"] + "-v2"},
    )
    _, event = envelope.decode((GOLDEN / "OrderShipped.v1.json").read_bytes())
    assert event == domain.OrderShipped(carrier="DHL", tracking_number="JD01-v2")


def test_a_missing_upcaster_is_undecodable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(envelope.CURRENT_SCHEMA_VERSION, "OrderShipped", 2)
    with pytest.raises(envelope.UndecodableEvent, match="no upcaster"):
        envelope.decode((GOLDEN / "OrderShipped.v1.json").read_bytes())
