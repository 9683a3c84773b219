"""The CLI names each command's handler as "module:function", loaded only when it runs: every
name must resolve, or the mistake would show only when someone runs that command."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from service.edge.cli import main


def _handlers(parser: argparse.ArgumentParser) -> Iterator[tuple[str, str]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                handler = sub.get_default("handler")
                if handler is not None:
                    yield name, handler
                yield from _handlers(sub)


def test_every_command_names_a_handler_that_exists() -> None:
    handlers = dict(_handlers(main.build_parser()))
    assert {"dev", "api", "projector", "migrate", "tail", "status", "rebuild", "park"} <= set(
        handlers
    )
    for command, handler in handlers.items():
        module, _, function = handler.partition(":")
        assert callable(getattr(main._module(module), function, None)), f"{command}: {handler}"
