"""A local OTLP/HTTP trace sink for the telemetry benchmark: where the service's exporter sends
its spans while tracing is on (``OTEL_EXPORTER_OTLP_ENDPOINT=sink.endpoint``), so the run pays
the real cost of exporting without a collector.

It accepts ``POST /v1/traces`` (protobuf, plain or gzip), answers 200 with an empty export
response, and counts requests and spans. A thread of this process, on 127.0.0.1.

    with OtlpSink() as sink:
        environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint, ...}
        ...
        print(sink.requests, sink.spans)
"""

from __future__ import annotations

import gzip
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

_EMPTY_RESPONSE = ExportTraceServiceResponse().SerializeToString()


class OtlpSink:
    """Counts what an OTLP/HTTP trace exporter sends it; use as a context manager."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.requests = 0
        self.spans = 0
        self.refused = 0  # requests it could not read (answered 400)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, port), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="otlp-sink", daemon=True
        )

    @property
    def endpoint(self) -> str:
        """The base URL for ``OTEL_EXPORTER_OTLP_ENDPOINT`` (the exporter adds /v1/traces)."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def received(self, spans: int) -> None:
        with self._lock:
            self.requests += 1
            self.spans += spans

    def failed(self) -> None:
        with self._lock:
            self.refused += 1

    def __enter__(self) -> OtlpSink:
        self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _span_count(body: bytes) -> int:
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    return sum(
        len(scope.spans) for resource in request.resource_spans for scope in resource.scope_spans
    )


def _handler_for(sink: OtlpSink) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the exporter's session expects

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path.rstrip("/") != "/v1/traces":
                self._answer(404, b"")
                return
            try:
                match (self.headers.get("Content-Encoding") or "").lower():
                    case "gzip":
                        body = gzip.decompress(body)
                    case "deflate":
                        body = zlib.decompress(body)
                spans = _span_count(body)
            except Exception:  # whatever does not parse is the exporter's problem: a 400
                sink.failed()
                self._answer(400, b"")
                return
            sink.received(spans)
            self._answer(200, _EMPTY_RESPONSE)

        def _answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # one line per export on stderr would drown the benchmark's output

    return Handler
