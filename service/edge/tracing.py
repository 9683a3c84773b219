"""Tracing set up from the standard ``OTEL_*`` environment, or not at all (the default).

On only when the environment asks for it: ``OTEL_TRACES_EXPORTER`` names an exporter (not
``none``), or an OTLP endpoint is set (``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``), and ``OTEL_SDK_DISABLED`` is not ``true``. Then
``traces`` makes an SDK tracer provider (the sampler of ``OTEL_TRACES_SAMPLER`` and
``OTEL_TRACES_SAMPLER_ARG``; spans batched to the OTLP/HTTP exporter, which reads its endpoint,
headers, timeout and compression from the environment itself) and installs it
(``service.infra.tracing``) for as long as the process serves. Off, nothing is installed: no
HTTP server span, no spans, no record headers.

A misconfiguration is refused at start-up (``EnvironmentProblem``), not warned about and
ignored as the SDK would: an operator who turned tracing on wants it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Mapping

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    DEFAULT_OFF,
    DEFAULT_ON,
    ParentBasedTraceIdRatio,
    Sampler,
    TraceIdRatioBased,
)

from service.infra import tracing
from service.kernel.errors import EnvironmentProblem

_log = logging.getLogger(__name__)

_FIXED_SAMPLERS: dict[str, Sampler] = {
    "always_on": ALWAYS_ON,
    "always_off": ALWAYS_OFF,
    "parentbased_always_on": DEFAULT_ON,
    "parentbased_always_off": DEFAULT_OFF,
}
_RATIO_SAMPLERS = {
    "traceidratio": TraceIdRatioBased,
    "parentbased_traceidratio": ParentBasedTraceIdRatio,
}
_EXPORTERS = ("otlp", "console")
_PROTOCOL = (
    "http/protobuf"  # the only OTLP transport installed (opentelemetry-exporter-otlp-proto-http)
)


def wanted(environ: Mapping[str, str]) -> bool:
    """Whether ``environ`` turns tracing on."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def sampler_from(environ: Mapping[str, str]) -> Sampler:
    """The sampler ``OTEL_TRACES_SAMPLER`` (default ``parentbased_always_on``, as the spec
    says) and ``OTEL_TRACES_SAMPLER_ARG`` (a ratio in [0, 1], default 1) name."""
    name = environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    if name in _FIXED_SAMPLERS:
        return _FIXED_SAMPLERS[name]
    if name not in _RATIO_SAMPLERS:
        known = ", ".join([*_FIXED_SAMPLERS, *_RATIO_SAMPLERS])
        raise EnvironmentProblem(f"OTEL_TRACES_SAMPLER={name!r} is not one of {known}")
    argument = environ.get("OTEL_TRACES_SAMPLER_ARG", "1").strip() or "1"
    try:
        ratio = float(argument)
    except ValueError:
        ratio = -1.0
    if not 0.0 <= ratio <= 1.0:
        raise EnvironmentProblem(
            f"OTEL_TRACES_SAMPLER_ARG={argument!r}: a ratio between 0 and 1 (0.01 samples 1%)"
        )
    return _RATIO_SAMPLERS[name](ratio)


def exporters_from(environ: Mapping[str, str]) -> list[SpanExporter]:
    """The exporters ``OTEL_TRACES_EXPORTER`` names (default ``otlp``): ``otlp`` over HTTP
    (the collector's port 4318), ``console`` (spans on stdout, for a look at them locally)."""
    names = [
        name.strip().lower()
        for name in environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")
        if name.strip() and name.strip().lower() != "none"
    ]
    unknown = [name for name in names if name not in _EXPORTERS]
    if unknown:
        raise EnvironmentProblem(
            f"OTEL_TRACES_EXPORTER names {', '.join(unknown)}; this service exports to "
            f"{' or '.join(_EXPORTERS)}"
        )
    exporters: list[SpanExporter] = []
    if "otlp" in names:
        protocol = (
            environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or _PROTOCOL
        )
        if protocol.strip().lower() != _PROTOCOL:
            raise EnvironmentProblem(
                f"OTLP protocol {protocol!r}: this service sends traces over {_PROTOCOL} "
                "(a collector's port 4318); set OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf"
            )
        exporters.append(OTLPSpanExporter())  # endpoint, headers, timeout: from the environment
    if "console" in names:
        exporters.append(ConsoleSpanExporter())
    return exporters


def provider_from(environ: Mapping[str, str], *, service_name: str) -> TracerProvider | None:
    """A tracer provider as ``environ`` configures it, or None when it leaves tracing off.
    ``service_name`` unless ``OTEL_SERVICE_NAME`` names the service."""
    if not wanted(environ):
        return None
    name = environ.get("OTEL_SERVICE_NAME") or service_name
    provider = TracerProvider(
        sampler=sampler_from(environ),
        resource=Resource.create({SERVICE_NAME: name}),
        id_generator=tracing.DrawnAheadIds(),
        shutdown_on_exit=False,  # ``traces`` shuts it down, flushing what is left
    )
    for exporter in exporters_from(environ):
        if isinstance(exporter, ConsoleSpanExporter):
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        else:
            provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


@contextlib.asynccontextmanager
async def traces(
    service_name: str, environ: Mapping[str, str] | None = None
) -> AsyncIterator[TracerProvider | None]:
    """Trace while the block runs, if the environment (``os.environ`` by default) turns
    tracing on; yields the provider, or None. On the way out the
    spans still buffered are exported (in a thread: the exporter blocks)."""
    provider = provider_from(os.environ if environ is None else environ, service_name=service_name)
    if provider is None:
        yield None
        return
    tracing.install(provider)
    _log.info("tracing on: %s, sampler %s", service_name, provider.sampler.get_description())
    try:
        yield provider
    finally:
        tracing.uninstall()
        await asyncio.to_thread(provider.shutdown)
