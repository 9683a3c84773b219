"""The compatibility gate: the schemas of published event versions never change, a new version
comes with an upcaster and a golden file, and no published version disappears."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest

from service.edge.cli.main import main
from service.infra.contracts import ASYNCAPI, event_contract
from service.kernel import contract, envelope
from service.kernel.settings import DEFAULT_TOPIC

ROOT = Path(__file__).resolve().parents[2]
CONTRACTS = ROOT / "contracts" / "events"
GOLDEN = ROOT / "tests" / "golden" / "events"


def _key(path: Path) -> contract.Key:
    match = re.fullmatch(r"(\w+)\.v(\d+)\.json", path.name)
    assert match is not None, f"{path}: files are named Type.vN.json"
    return match[1], int(match[2])


def _published() -> dict[contract.Key, dict[str, Any]]:
    return {_key(path): json.loads(path.read_text()) for path in CONTRACTS.glob("*.json")}


def _goldens() -> set[contract.Key]:
    return {_key(path) for path in GOLDEN.glob("*.json")}


def _generated() -> dict[contract.Key, dict[str, Any]]:
    return contract.current_schemas(envelope.CURRENT_SCHEMA_VERSION)


def test_the_published_contract_holds() -> None:
    problems = contract.contract_problems(
        _generated(), _published(), upcasters=set(envelope.UPCASTERS), goldens=_goldens()
    )
    assert problems == []


def test_a_published_schema_that_changes_shape_is_refused_with_the_way_forward() -> None:
    changed = copy.deepcopy(_generated())
    schema = changed[("OrderPaid", 1)]["$defs"]["OrderPaid"]
    schema["properties"]["amount"] = {"type": "string"}  # a field changes type

    problems = contract.contract_problems(
        changed, _published(), upcasters=set(envelope.UPCASTERS), goldens=_goldens()
    )

    assert len(problems) == 1
    assert problems[0].startswith("the data of OrderPaid v1 changed shape")
    assert "add version 2" in problems[0]
    assert "an upcaster from v1" in problems[0]
    assert "tests/golden/events/OrderPaid.v2.json" in problems[0]


def test_a_new_version_needs_an_upcaster_from_the_one_before_and_a_golden_file() -> None:
    generated = _generated()
    v2 = copy.deepcopy(generated.pop(("OrderPaid", 1)))
    generated[("OrderPaid", 2)] = v2
    published = {**_published(), ("OrderPaid", 2): v2}

    problems = contract.contract_problems(
        generated, published, upcasters=set(envelope.UPCASTERS), goldens=_goldens()
    )

    assert problems == [
        "OrderPaid v2 has no upcaster from v1: add one to UPCASTERS in "
        "service/kernel/envelope.py (events of every version stay in the log)",
        "OrderPaid v2 has no golden file: add tests/golden/events/OrderPaid.v2.json",
    ]
    assert not contract.contract_problems(
        generated,
        published,
        upcasters={*envelope.UPCASTERS, ("OrderPaid", 1)},
        goldens={*_goldens(), ("OrderPaid", 2)},
    )


def test_the_versions_shipped_so_far_each_have_their_upcaster_and_golden_file() -> None:
    without = {k for k in envelope.UPCASTERS if k != ("OrderCreated", 1)}
    problems = contract.contract_problems(
        _generated(), _published(), upcasters=without, goldens=_goldens()
    )
    assert problems == [
        "OrderCreated v2 has no upcaster from v1: add one to UPCASTERS in "
        "service/kernel/envelope.py (events of every version stay in the log)"
    ]
    goldens = _goldens() - {("OrderShipped", 1)}
    problems = contract.contract_problems(
        _generated(), _published(), upcasters=set(envelope.UPCASTERS), goldens=goldens
    )
    assert problems == [
        "OrderShipped v1 has no golden file: add tests/golden/events/OrderShipped.v1.json"
    ]


def test_a_published_version_never_disappears_and_a_new_one_must_be_published() -> None:
    generated = _generated()
    generated[("OrderPaid", 2)] = generated.pop(("OrderPaid", 1))
    published = {k: v for k, v in _published().items() if k != ("OrderPaid", 1)}

    problems = contract.contract_problems(
        generated, published, upcasters={("OrderPaid", 1)}, goldens=_goldens()
    )

    assert "OrderPaid v2 is not published: run `orders contract export`" in problems[0]
    assert "OrderPaid v1 was published and is gone" in problems[1]


def test_contract_export_writes_the_committed_files_and_never_rewrites_a_published_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    export = ["contract", "export", "--to", str(tmp_path), "--asyncapi", str(tmp_path / "a.json")]
    main(export)

    written = {path.name: path.read_text() for path in tmp_path.glob("*.v*.json")}
    current = {contract.file_name(k) for k in _generated()}
    assert written == {name: (CONTRACTS / name).read_text() for name in current}
    assert "10 schema(s) written" in capsys.readouterr().out

    main(export)  # again: nothing to write
    assert "0 schema(s) written" in capsys.readouterr().out

    edited = tmp_path / "OrderPaid.v1.json"
    edited.write_text(json.dumps({"type": "object"}))
    with pytest.raises(SystemExit, match="the data of OrderPaid v1 changed shape"):
        main(export)
    assert json.loads(edited.read_text()) == {"type": "object"}  # left as it was


def test_the_committed_asyncapi_document_is_the_one_the_contract_makes() -> None:
    committed = json.loads(ASYNCAPI.read_text())
    assert committed == event_contract(DEFAULT_TOPIC), (
        "docs/events/asyncapi.json is stale: run `orders contract export`"
    )


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [
            ref for v in node.values() for ref in _refs(v)
        ]
    if isinstance(node, list):
        return [ref for item in node for ref in _refs(item)]
    return []


def _resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = document
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def test_the_asyncapi_document_names_every_published_version_and_its_references_resolve() -> None:
    document = event_contract("shop.orders")

    assert document["asyncapi"].startswith("3.")
    channel = document["channels"]["orderEvents"]
    assert channel["address"] == "shop.orders"
    assert set(channel["messages"]) == {f"{t}.v{v}" for t, v in _published()}
    operation = document["operations"]["receiveOrderEvents"]
    assert operation["action"] == "receive"
    assert len(operation["messages"]) == len(channel["messages"])
    unresolved = [ref for ref in _refs(document) if _resolve(document, ref) is None]
    assert unresolved == []
    headers = _resolve(document, "#/components/schemas/Headers")
    assert headers["required"] == ["type", "schema_version", "correlation_id"]


@pytest.mark.parametrize("golden_file", sorted(GOLDEN.glob("*.json")), ids=lambda p: p.name)
def test_every_golden_record_is_valid_against_its_message_in_the_asyncapi_document(
    golden_file: Path,
) -> None:
    document = event_contract(DEFAULT_TOPIC)
    name, version = _key(golden_file)
    payload = {
        "components": document["components"],
        "allOf": [{"$ref": f"#/components/messages/{name}.v{version}/payload"}],
    }
    record = json.loads(golden_file.read_text())
    validator = jsonschema_rs.Draft7Validator(payload)
    assert [error.message for error in validator.iter_errors(record)] == []

    # ... and the schema is not vacuous: data of another type and version is refused.
    record["schema_version"] = version + 1
    assert not validator.is_valid(record)
