"""Spans through the OpenTelemetry SDK, exported with OTLP over HTTP off the hot path.

The trace context of every request is decided and propagated in `core` with `propagation` (bytes only).
Only a *sampled* request reaches this module, once, when it is over: `SpanRecorder.record` starts and ends
one SDK span with the ids already sent on the wire (a preset `IdGenerator` hands the SDK those ids), the
request's start and end times, Envoy's span shape and Istio's tags. The span goes to a
`BatchSpanProcessor`: a queue and a background thread that exports batches with the OTLP/HTTP exporter.
A collector that is down costs dropped spans (one warning when it goes down, one line when it is back),
never a request: the queue is bounded and the data path never waits for it.

Endpoint: `--otlp-endpoint`, else the standard `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` /
`OTEL_EXPORTER_OTLP_ENDPOINT` environment variables, else http://127.0.0.1:4318/v1/traces. The other
`OTEL_EXPORTER_OTLP_*` (headers, timeout, compression, certificates) and `OTEL_BSP_*` (batching)
variables are honoured by the SDK itself.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections import deque
from collections.abc import Mapping, Sequence

from opentelemetry import trace as trace_api
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

EXPORT_SWITCH_INTERVAL = 0.0005  # seconds: the GIL switch interval while spans are exported (see batched)

log = logging.getLogger("meshproxy.telemetry")

DEFAULT_OTLP_ENDPOINT = "http://127.0.0.1:4318/v1/traces"
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
SHUTDOWN_TIMEOUT_MS = 1000  # at exit: time given to send what is queued (0 when the collector is known down)
SAMPLED_FLAGS = TraceFlags(TraceFlags.SAMPLED)
_EXPORTER_LOGGERS = ("opentelemetry.exporter.otlp.proto.http", "opentelemetry.exporter.otlp.common")
_QUEUE_LOGGER = "opentelemetry.sdk._shared_internal"


def resolve_endpoint(explicit: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The endpoint to pass to the exporter: explicit, else None when the OTEL_* variables say (the exporter
    reads them), else meshproxy's default."""
    if explicit:
        return explicit
    if any(environ.get(name) for name in ENDPOINT_VARIABLES):
        return None
    return DEFAULT_OTLP_ENDPOINT


def describe_endpoint(explicit: str | None, environ: Mapping[str, str] = os.environ) -> str:
    endpoint = resolve_endpoint(explicit, environ)
    if endpoint is not None:
        return endpoint
    if environ.get(ENDPOINT_VARIABLES[0]):
        return environ[ENDPOINT_VARIABLES[0]]
    return environ[ENDPOINT_VARIABLES[1]].rstrip("/") + "/v1/traces"


class _PresetIds(IdGenerator):
    """Hands the SDK the ids this proxy already put on the wire (set just before each span starts)."""

    def __init__(self) -> None:
        self.trace_id = 0
        self.span_id = 0

    def generate_span_id(self) -> int:
        return self.span_id

    def generate_trace_id(self) -> int:
        return self.trace_id


class ReportingExporter(SpanExporter):
    """Wraps the OTLP exporter: logs collector state changes once instead of every failed batch."""

    def __init__(self, inner: SpanExporter, endpoint: str) -> None:
        self.inner = inner
        self.endpoint = endpoint
        self.down = False
        self.exported = 0
        self.dropped = 0
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception:  # an exporter bug must not kill the batch thread
            log.exception("span export failed")
            result = SpanExportResult.FAILURE
        with self._lock:
            if result is SpanExportResult.SUCCESS:
                self.exported += len(spans)
                if self.down:
                    self.down = False
                    log.info("span export to %s works again", self.endpoint)
            else:
                self.dropped += len(spans)
                if not self.down:
                    self.down = True
                    log.warning("span export to %s failed: spans are dropped until the collector answers "
                                "(requests are not affected)", self.endpoint)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class LazyOTLPExporter(SpanExporter):
    """OpenTelemetry's OTLP/HTTP exporter, made by the export thread when it first has spans to send: the exporter
    brings `requests` (4.6 MiB resident), which a proxy that samples nothing never needs."""

    def __init__(self, endpoint: str | None) -> None:
        self.endpoint = endpoint
        self.inner: SpanExporter | None = None
        self.stopped = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self.stopped:
            return SpanExportResult.FAILURE
        if self.inner is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            self.inner = OTLPSpanExporter(endpoint=self.endpoint)
        return self.inner.export(spans)

    def shutdown(self) -> None:
        self.stopped = True
        if self.inner is not None:
            self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis) if self.inner is not None else True


def otlp_exporter(explicit_endpoint: str | None) -> ReportingExporter:
    for name in _EXPORTER_LOGGERS:  # every failed batch would log an error: ReportingExporter says it once
        logging.getLogger(name).setLevel(logging.CRITICAL)
    logging.getLogger(_QUEUE_LOGGER).setLevel(logging.ERROR)  # "queue full, dropping" while the collector is down
    return ReportingExporter(LazyOTLPExporter(resolve_endpoint(explicit_endpoint)), describe_endpoint(explicit_endpoint))


class SpanBuffer(SpanProcessor):
    """The console's recent spans: a second span processor beside the OTLP one, keeping the last `size` ended spans
    in memory (a deque append on the event loop thread, no copy; the console reads them when asked)."""

    def __init__(self, size: int) -> None:
        self.spans: deque[ReadableSpan] = deque(maxlen=size)

    def on_start(self, span: object, parent_context: object = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        self.spans.append(span)

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


class SpanRecorder:
    """Turns finished, sampled requests into SDK spans. One per process."""

    def __init__(self, processor: SpanProcessor, service_name: str, exporter: ReportingExporter | None = None,
                 keep: int = 0) -> None:
        """`keep`: spans kept in memory for the console (`buffer`), besides the export; 0 keeps none."""
        self.processor = processor
        self.exporter = exporter
        self._ids = _PresetIds()
        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or service_name})
        self.provider = TracerProvider(resource=resource, id_generator=self._ids, sampler=ALWAYS_ON,
                                       shutdown_on_exit=False)
        self.provider.add_span_processor(processor)
        self.buffer = SpanBuffer(keep) if keep > 0 else None
        if self.buffer is not None:
            self.provider.add_span_processor(self.buffer)
        self.tracer = self.provider.get_tracer("meshproxy")
        self.closed = False

    @classmethod
    def batched(cls, exporter: ReportingExporter, service_name: str, keep: int = 0) -> SpanRecorder:
        # The export thread encodes a batch (up to 512 spans) in Python, holding the GIL; at the default 5 ms switch
        # interval the event loop waits up to 5 ms for it each time it wants the GIL back, which showed in p99 under
        # load. A shorter interval interleaves an export with the requests instead.
        sys.setswitchinterval(min(sys.getswitchinterval(), EXPORT_SWITCH_INTERVAL))
        return cls(BatchSpanProcessor(exporter), service_name, exporter, keep)

    def record(self, name: str, server: bool, trace_id: int, span_id: int, parent_id: int | None, start_ns: int,
               end_ns: int, attributes: dict[str, str], error: bool) -> None:
        ids = self._ids
        ids.trace_id, ids.span_id = trace_id, span_id
        context = None
        if parent_id is not None:
            parent = SpanContext(trace_id, parent_id, is_remote=True, trace_flags=SAMPLED_FLAGS)
            context = trace_api.set_span_in_context(NonRecordingSpan(parent))
        else:  # a root span (or a trace id kept without a valid parent): never the ambient context's child
            context = trace_api.set_span_in_context(trace_api.INVALID_SPAN)
        span = self.tracer.start_span(name, context=context, kind=SpanKind.SERVER if server else SpanKind.CLIENT,
                                      attributes=attributes, start_time=start_ns)
        if error:
            span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=end_ns)

    def close(self) -> None:
        """Send what is queued, waiting at most SHUTDOWN_TIMEOUT_MS (not at all when the collector is down)."""
        if self.closed:
            return
        self.closed = True
        timeout = 0 if self.exporter is not None and self.exporter.down else SHUTDOWN_TIMEOUT_MS
        # BatchSpanProcessor.shutdown() waits up to 30 s; its batch processor takes a timeout, after which it
        # shuts the exporter down (which abandons retries) and returns.
        batch = getattr(self.processor, "_batch_processor", None)
        if batch is not None and hasattr(batch, "shutdown"):
            batch.shutdown(timeout_millis=timeout)
        else:
            self.processor.shutdown()
