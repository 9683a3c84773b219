"""The compatibility gate: the schemas of published event versions never change, a new version
comes with an upcaster and a golden file, and no published version disappears."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

from service.edge.cli.main import main
from service.kernel import contract, envelope

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
    v2 = copy.deepcopy(generated.pop(("OrderCreated", 1)))
    generated[("OrderCreated", 2)] = v2
    published = {**_published(), ("OrderCreated", 2): v2}

    problems = contract.contract_problems(
        generated, published, upcasters=set(envelope.UPCASTERS), goldens=_goldens()
    )

    assert problems == [
        "OrderCreated v2 has no upcaster from v1: add one to UPCASTERS in "
        "service/kernel/envelope.py (events of every version stay in the log)",
        "OrderCreated v2 has no golden file: add tests/golden/events/OrderCreated.v2.json",
    ]
    assert not contract.contract_problems(
        generated,
        published,
        upcasters={*envelope.UPCASTERS, ("OrderCreated", 1)},
        goldens={*_goldens(), ("OrderCreated", 2)},
    )


def test_a_published_version_never_disappears_and_a_new_one_must_be_published() -> None:
    generated = _generated()
    generated[("OrderCreated", 2)] = generated.pop(("OrderCreated", 1))
    published = {k: v for k, v in _published().items() if k != ("OrderCreated", 1)}

    problems = contract.contract_problems(
        generated, published, upcasters={("OrderCreated", 1)}, goldens=_goldens()
    )

    assert "OrderCreated v2 is not published: run `orders contract export`" in problems[0]
    assert "OrderCreated v1 was published and is gone" in problems[1]


def test_contract_export_writes_the_committed_files_and_never_rewrites_a_published_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["contract", "export", "--to", str(tmp_path)])

    written = {path.name: path.read_text() for path in tmp_path.glob("*.json")}
    assert written == {path.name: path.read_text() for path in CONTRACTS.glob("*.json")}
    assert "9 schema(s) written" in capsys.readouterr().out

    main(["contract", "export", "--to", str(tmp_path)])  # again: nothing to write
    assert "0 schema(s) written" in capsys.readouterr().out

    edited = tmp_path / "OrderPaid.v1.json"
    edited.write_text(json.dumps({"type": "object"}))
    with pytest.raises(SystemExit, match="the data of OrderPaid v1 changed shape"):
        main(["contract", "export", "--to", str(tmp_path)])
    assert json.loads(edited.read_text()) == {"type": "object"}  # left as it was
