"""The published event contract: the JSON Schema of each event type's ``data`` at each schema
version ever written, generated from the msgspec types (never written by hand), and the rules
that keep it: a published version never changes; a new one comes with an upcaster from the
one before and a golden file.

Pure: the caller reads the committed schemas (``contracts/events/<Type>.v<N>.json``) and the
golden files, and this says what breaks the rules.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from typing import Any

import msgspec

from service.kernel.events import EVENT_TYPES

Key = tuple[str, int]  # (event type, schema version)


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


def current_schemas(current: Mapping[str, int]) -> dict[Key, dict[str, Any]]:
    """The schema of each event type's data at its current version, from its msgspec type."""
    return {(name, current[name]): msgspec.json.schema(cls) for name, cls in EVENT_TYPES.items()}


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
