"""The HTTP ceiling: a bare Litestar app served exactly as ``orders api`` serves the real one.

The same server configuration as ``orders api`` (``service.edge.bootstrap.server_config``: one
uvicorn server in one process, httptools parser, uvloop, no access log; garbage collection
tuned by ``service.infra.runtime.tune_gc``), the same request bodies decoded and validated into the
API's own msgspec types, and answers of the same shape and headers; but no writer, no Kafka, no
database. What the command API reaches, as a share of this, is what the service itself costs on
top of HTTP.

    python -m benchmarks.bare_http --port 8123
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import uuid

import uvicorn
from litestar import Litestar, Response, get, post

from service.edge.bootstrap import server_config
from service.edge.http.commands import AddItemBody, CommandResult, CreateOrderBody
from service.infra.runtime import tune_gc

_offsets = itertools.count()


def _answer(order_id: str, version: int, status: int) -> Response[CommandResult]:
    token = f"0:{next(_offsets)}"
    headers = {"ETag": f'"{version}"', "X-Consistency-Token": token}
    return Response(CommandResult(order_id, version, token), status_code=status, headers=headers)


@post("/orders", status_code=201)
async def create_order(data: CreateOrderBody) -> Response[CommandResult]:
    return _answer(str(uuid.uuid4()), 1, 201)


@post("/orders/{order_id:str}/items", status_code=200)
async def add_item(order_id: str, data: AddItemBody) -> Response[CommandResult]:
    return _answer(order_id, 2, 200)


@get("/health/ready")
async def ready() -> dict[str, str]:
    return {"status": "ready"}


def create_app() -> Litestar:
    return Litestar(
        route_handlers=[create_order, add_item, ready],
        request_max_body_size=64 * 1024,  # the API's default
        logging_config=None,
    )


async def serve(host: str, port: int) -> None:
    """uvicorn configured exactly as for the API's server, garbage collection tuned alike."""
    server = uvicorn.Server(server_config(create_app(), host=host, port=port))
    tune_gc()
    await server.serve()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - the API runs on uvloop where it exists
        asyncio.run(serve(args.host, args.port))
    else:
        uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
