"""One request, top to bottom, as in DESIGN.md's diagram.

`Stream` is the per-request state both protocols talk to: the downstream side
feeds it request body bytes, the upstream side feeds it the response, and it
writes the response downstream as it arrives (backpressure both ways). The
functions below make the decisions (route, local replies, attempts, retries).
They run as callbacks, synchronously, from the moment a request head is parsed
to the end of its response; a task carries on only across a wait (a fault
delay, a connect, a retry back-off), so a request served on a kept-alive
upstream connection costs no task, no future and no task switch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final

from ..http1.head import RequestHead
from ..http1.wire import (
    CONTINUE_100,
    CRLF,
    HOP_BY_HOP,
    LAST_CHUNK,
    chunk,
    local_reply,
    status_line,
)
from ..routing.cluster import Cluster, Endpoint
from ..routing.cors import ORIGIN as CORS_ORIGIN
from ..routing.cors import REQUEST_METHOD as CORS_REQUEST_METHOD
from ..routing.cors import CorsPolicy
from ..routing.policy import (
    ACTION_DIRECT_RESPONSE,
    ACTION_REDIRECT,
    NO_RETRY,
    RETRY_ON_RETRIABLE_HEADERS,
    FaultPolicy,
    HeaderMutation,
    RetryPolicy,
    Route,
    merge_mutations,
)
from ..routing.rewrite import ORIGINAL_PATH
from .balancer import ClusterState, EndpointState
from .fault import GRPC_CODES, MILLION, decide_abort, decide_delay
from .local_reply import (
    DC,
    DI,
    FAULT_ABORT_BODY,
    FI,
    NO_CLUSTER,
    NO_HEALTHY_UPSTREAM,
    NO_ROUTE,
    OVERLOADED_HEADER,
    UC,
    UO,
    URX,
    Reply,
    RetriableResponse,
    UpstreamError,
    UpstreamOverflowError,
    UpstreamTimeoutError,
)
from .retry import (
    CONNECT_FAILURE,
    PER_TRY_TIMEOUT,
    RESET,
    backoff,
    should_retry_failure,
    should_retry_response,
)
from .upstream import FRAMING_CHUNKED, FRAMING_EOF, FRAMING_LENGTH, ResponseSink, UpstreamConnection

if TYPE_CHECKING:
    from .listener import DownstreamProtocol

log = logging.getLogger("meshproxy.exchange")

READ_PAUSED_BY_UPSTREAM: Final = 1
READ_PAUSED_BY_BUFFER: Final = 2
PENDING_BODY_LIMIT: Final = 1 << 20  # request body held while connecting; above it, stop reading the client
RETRIABLE_HEADER_NAMES: Final = b"x-envoy-retriable-header-names"  # request header naming retriable response headers
RETRY_BUFFER_LIMIT: Final = 64 * 1024  # request bodies up to this size are kept for a retry (Envoy buffers for replay)
RESPONSE_HOP_BY_HOP: Final = HOP_BY_HOP


class Stream(ResponseSink):
    """Per-request state shared by the downstream and upstream protocols."""

    __slots__ = (
        "conn", "head", "pending", "pending_size", "request_complete", "upstream", "response_started",
        "response_chunked", "response_complete", "status", "flags", "start", "response_bytes", "close_after",
        "request_mutation", "response_mutation", "route", "cluster", "endpoint", "head_only", "sent", "replayable",
        "body_size", "retries_left", "timer", "sent_at", "upstream_extra", "upstream_peer", "request_id",
        "cluster_state", "out", "downstream_extra", "peer", "trace", "target", "attempt", "tried", "deadline",
        "hash_key", "avoid_previous", "retrying", "second_chance", "ended",
    )

    def __init__(self, conn: DownstreamProtocol, head: RequestHead) -> None:
        self.conn = conn
        self.head = head
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.request_complete = False
        self.upstream: UpstreamConnection | None = None  # the attempt in flight, if any
        self.response_started = False
        self.response_chunked = False
        self.response_complete = False
        self.status = 0
        self.flags: list[str] = []
        self.start = time.monotonic()
        self.response_bytes = 0
        self.close_after = not head.keep_alive
        self.request_mutation: HeaderMutation | None = None
        self.response_mutation: HeaderMutation | None = None
        self.route: Route | None = None
        self.cluster: Cluster | None = None
        self.endpoint: Endpoint | None = None
        self.head_only = head.method == b"HEAD"
        self.sent: list[bytes] = []  # body bytes written to the current attempt, kept for a retry
        self.replayable = True  # false once the body outgrew RETRY_BUFFER_LIMIT: no retry after sending
        self.body_size = 0
        self.retries_left = 0
        self.timer: asyncio.TimerHandle | None = None
        self.sent_at = 0.0
        self.upstream_extra = b""  # header lines added to the upstream request: request id, trace (telemetry)
        self.upstream_peer = b""  # ... and this workload's peer metadata, unless the request leaves the mesh
        self.request_id: bytes | None = None
        self.cluster_state: ClusterState | None = None
        self.out: list[bytes] = []  # response bytes not yet written downstream (see flush)
        self.downstream_extra: tuple[tuple[bytes, bytes], ...] = ()  # added to the response (telemetry)
        self.peer: bytes | None = None  # the other side's peer metadata header (telemetry)
        self.trace: tuple[bytes, bytes, bytes | None] | None = None  # span ids when sampled (telemetry)
        # Attempts (see _forward and _attempt): their endpoint, count, and the retry state across them.
        self.target: EndpointState | None = None
        self.attempt = 0
        self.tried: list[Endpoint] = []
        self.deadline: float | None = None  # the route timeout, as loop time
        self.hash_key: int | None = None
        self.avoid_previous = False
        self.retrying = False  # holds a retry slot of the cluster (maxRetries, retry budget)
        self.second_chance = True  # one free retry when a kept-alive connection turns out closed by the server
        self.ended = False

    # ---- request body, from the downstream protocol

    def on_request_body(self, data: bytes) -> None:
        self.body_size += len(data)
        if self.replayable and self.body_size > RETRY_BUFFER_LIMIT:
            self.replayable = False
            self.sent = []
        upstream = self.upstream
        if upstream is not None:
            upstream.write_body(data)
            if self.replayable:
                self.sent.append(data)
            return
        self.pending.append(data)
        self.pending_size += len(data)
        if self.pending_size > PENDING_BODY_LIMIT:
            self.conn.pause_reading(READ_PAUSED_BY_BUFFER)

    def on_request_end(self) -> None:
        self.request_complete = True
        if self.upstream is not None:
            self.upstream.end_body()

    # ---- response, from the upstream connection (ResponseSink)

    def on_response_head(self, status: int, headers: list[tuple[bytes, bytes]], framing: int,
                         content_length: int | None) -> None:
        route = self.route
        retry = route.retry if route is not None else NO_RETRY
        if retry.num_retries and should_retry_response(
                retry, status, headers,
                self.head.header(RETRIABLE_HEADER_NAMES) if retry.retry_on & RETRY_ON_RETRIABLE_HEADERS else None):
            if self.retries_left > 0 and self.replayable and self.cluster_state is not None \
                    and _retry_allowed(self, self.cluster_state):
                self._resolve(RetriableResponse(status))  # discarded: the exchange retries
                return
            self.flags.append(URX)  # retries exhausted: the last upstream answer goes to the client
        self.status = status
        self.response_started = True
        conn = self.conn
        if conn.telemetry.reads_response:
            headers = conn.telemetry.on_response(self, headers)
        parts = [status_line(status)]
        extend = parts.extend
        mutation = self.response_mutation
        if mutation is not None:
            headers = apply_mutation(headers, mutation)
        for name, value in headers:
            if name not in RESPONSE_HOP_BY_HOP:
                extend((name, b": ", value, CRLF))  # a tuple per line: cheaper than a list
        for name, value in self.downstream_extra:
            extend((name, b": ", value, CRLF))
        if framing == FRAMING_LENGTH:
            assert content_length is not None
            parts.append(b"content-length: %d\r\n" % content_length)
        elif framing == FRAMING_CHUNKED or framing == FRAMING_EOF:
            if self.head.version == b"1.1":
                parts.append(b"transfer-encoding: chunked\r\n")
                self.response_chunked = True
            else:
                self.close_after = True  # HTTP/1.0 client: the body ends when we close
        if self.sent_at:
            parts.append(b"x-envoy-upstream-service-time: %d\r\n" % int((conn.loop.time() - self.sent_at) * 1000))
        if conn.ctx.draining or not self.request_complete:  # Envoy: a response before the request ended closes
            self.close_after = True  # an HTTP/1 connection (downstream_rq_response_before_rq_complete)
        if self.close_after:
            parts.append(b"connection: close\r\n")
        parts.append(CRLF)
        self.out.append(b"".join(parts))  # written with the body bytes of the same read: one send

    def on_response_body(self, data: bytes) -> None:
        self.response_bytes += len(data)
        if self.head_only:
            return
        self.out.append(chunk(data) if self.response_chunked else data)

    def flush(self) -> None:
        """Write what the last upstream read produced, in one call (the upstream calls this after each read), and
        finish the attempt if its response ended: after the read, so bytes after the response, in the same read,
        are judged on this connection before it goes back to the pool."""
        out = self.out
        if out:
            self.conn.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
        if self.response_complete and self.upstream is not None:
            attempt_over(self, None)

    def on_response_end(self) -> None:
        if self.response_chunked and not self.head_only:
            self.out.append(LAST_CHUNK)
        self.response_complete = True

    def on_upstream_error(self, error: UpstreamError) -> None:
        self._resolve(error)

    def on_timeout(self, per_try: bool) -> None:
        self.timer = None
        self._resolve(UpstreamTimeoutError(per_try))

    def _resolve(self, outcome: UpstreamError) -> None:
        attempt_over(self, outcome)

    def cancel_timers(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def pause_upstream_writes(self) -> None:
        self.conn.pause_reading(READ_PAUSED_BY_UPSTREAM)

    def resume_upstream_writes(self) -> None:
        self.conn.resume_reading(READ_PAUSED_BY_UPSTREAM)

    # ---- replies made here

    def reply(self, status: int, body: bytes, flag: str, extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        self.status = status
        if flag:
            self.flags.append(flag)
        self.response_started = True
        self.response_complete = True
        if not self.request_complete:
            self.close_after = True  # the rest of the request body is not read
        close = self.close_after or self.conn.ctx.draining
        self.conn.write(local_reply(status, body, close=close, server=self.conn.server_name,
                                    extra=extra + self.downstream_extra, head_only=self.head_only))


def apply_mutation(headers: list[tuple[bytes, bytes]], mutation: HeaderMutation) -> list[tuple[bytes, bytes]]:
    """Envoy's order: remove, then set (replace all values), then add (append)."""
    drop = mutation.remove | {name for name, _ in mutation.set}
    out = [(n, v) for n, v in headers if n not in drop] if drop else list(headers)
    out += mutation.set
    out += mutation.add
    return out


PROXY_SET_HEADERS: Final = frozenset({b"host", b"x-envoy-attempt-count", b"x-envoy-expected-rq-timeout-ms", ORIGINAL_PATH})


def shadow_authority(authority: bytes) -> bytes:
    """Envoy's mirror host: `-shadow` after the host name, before any port."""
    host, sep, port = authority.rpartition(b":")
    if sep and port.isdigit():
        return host + b"-shadow:" + port
    return authority + b"-shadow"


def request_head_bytes(stream: Stream, head: RequestHead, attempt: int, deadline: float | None = None,
                       now: float = 0.0, shadow: Cluster | None = None) -> bytes:
    """The upstream request head: origin-form, rewritten as the route says, hop-by-hop removed, framing regenerated."""
    conn = stream.conn
    drop = conn.strip_request | head.connection_tokens if head.connection_tokens else conn.strip_request
    headers = head.headers
    if stream.request_mutation is not None:
        headers = apply_mutation(headers, stream.request_mutation)
    path, authority = head.path_and_query, head.authority
    route = stream.route
    rewrite = route.rewrite if route is not None else None
    original_path = None
    if rewrite is not None:
        if rewrite.rewrites_path:
            rewritten = rewrite.path(head.path)
            if rewritten != head.path:
                original_path = head.path_and_query
                path = rewritten + b"?" + head.query if head.query else rewritten
        if rewrite.authority:
            authority = rewrite.authority
    if shadow is not None:  # a mirror's copy, to that cluster
        authority = shadow_authority(authority)
    parts = [head.method, b" ", path, b" HTTP/1.1\r\nhost: ", authority, CRLF]
    extend = parts.extend
    if original_path is not None:
        parts.extend((ORIGINAL_PATH, b": ", original_path, CRLF))
    xff = None
    has_proto = False
    for name, value in headers:
        if name in drop:
            continue
        if name == b"x-forwarded-for":
            xff = value
            continue
        if name == b"x-forwarded-proto":
            has_proto = True
        if name in PROXY_SET_HEADERS:
            continue
        extend((name, b": ", value, CRLF))  # a tuple per line: cheaper than a list
    peer = conn.peer_ip
    extend((b"x-forwarded-for: ", (xff + b", " + peer) if xff else peer, CRLF))
    if not has_proto:
        parts.append(b"x-forwarded-proto: http\r\n")
    if stream.upstream_extra:
        parts.append(stream.upstream_extra)
    if stream.upstream_peer:
        cluster = shadow or stream.cluster
        if cluster is None or not cluster.external:  # Istio never gives peer metadata to a MESH_EXTERNAL service
            parts.append(stream.upstream_peer)
    parts.append(b"x-envoy-attempt-count: %d\r\n" % attempt)
    if deadline is not None:
        parts.append(b"x-envoy-expected-rq-timeout-ms: %d\r\n" % max(0, int((deadline - now) * 1000)))
    if head.chunked:
        parts.append(b"transfer-encoding: chunked\r\n")
    elif head.content_length is not None:
        parts.append(b"content-length: %d\r\n" % head.content_length)
    parts.append(CRLF)
    return b"".join(parts)


def start(conn: DownstreamProtocol, stream: Stream) -> None:
    """Begin a request's exchange; the listener calls this for each request in turn (never raises).

    It runs synchronously, from the parser's callback, as far as it can: routing, local replies and, when an idle
    upstream connection is ready, the attempt itself, whose response then arrives through the upstream's callbacks
    (`attempt_over`). A task is made only for what must wait: a fault delay, a connect, a retry back-off.
    """
    try:
        finished = _route(conn, stream)
    except Exception:  # noqa: BLE001  # a bug must cost one request, not the connection or the process
        _failed(conn, stream)
        return
    if finished:
        _end(conn, stream)


def _spawn(conn: DownstreamProtocol, stream: Stream, step: Callable[..., Awaitable[bool]], *args: object) -> None:
    """Continue the exchange in a task, `step(conn, stream, *args)`; the listener cancels it if the client goes away
    or times out. (The step's coroutine is made in the task: a task cancelled before it ran leaves none behind.)"""
    conn.active_task = conn.loop.create_task(_run(conn, stream, step, args))


async def _run(conn: DownstreamProtocol, stream: Stream, step: Callable[..., Awaitable[bool]],
               args: tuple[object, ...]) -> None:
    try:
        finished = await step(conn, stream, *args)
    except asyncio.CancelledError:
        abandon(conn, stream)
        return
    except Exception:  # noqa: BLE001  # as in start()
        _failed(conn, stream)
        return
    if finished:
        _end(conn, stream)


def abandon(conn: DownstreamProtocol, stream: Stream) -> None:
    """The listener stopped the exchange (client gone, stream idle timeout, bad request body)."""
    stream.flags.append(DC)  # the listener replaces it when it knows a better reason
    _drop_upstream(conn, stream)
    _end(conn, stream)


def _failed(conn: DownstreamProtocol, stream: Stream) -> None:
    """A bug met on this request: the process must survive anything a peer can make happen."""
    log.exception("exchange failed for %s %r", stream.head.method, stream.head.target)
    try:
        _drop_upstream(conn, stream)
        if not stream.response_started:
            stream.reply(500, b"internal error", "")
        else:
            stream.close_after = True
    finally:
        _end(conn, stream)


def _end(conn: DownstreamProtocol, stream: Stream) -> None:
    """The one way a stream finishes: counters back, then the listener writes the access log and goes on."""
    if stream.ended:
        return
    stream.ended = True
    if stream.timer is not None:
        stream.cancel_timers()
    state = stream.cluster_state
    if state is not None:
        state.active_requests -= 1
        if stream.retrying:
            state.active_retries -= 1
            stream.retrying = False
    conn.stream_done(stream)


def _drop_upstream(conn: DownstreamProtocol, stream: Stream) -> None:
    upstream = stream.upstream
    if upstream is not None:
        stream.upstream = None
        upstream.sink = None
        if stream.target is not None:
            stream.target.active -= 1
        conn.pool.discard(upstream)


def _route(conn: DownstreamProtocol, stream: Stream) -> bool:
    """Route and apply the route's filters; True when the request was answered here."""
    head = stream.head
    route, port = conn.ctx.table.match(head)  # one read of the table: a reload never changes this request
    if route is None:
        stream.reply(*_reply_args(NO_ROUTE))
        return True
    stream.route = route
    if route.cors is not None and _cors(stream, route.cors):
        return True  # a preflight answered here
    # Fault filter: before routing to the upstream, in the caller's proxy.
    fault = route.fault
    if fault.active:
        delay = decide_delay(fault, conn.randbelow)
        if delay:
            stream.flags.append(DI)
            _spawn(conn, stream, _delayed, route, port, delay)
            return False
        if decide_abort(fault, conn.randbelow):
            _reply_abort(stream, fault)
            return True
    return _forward(conn, stream, route, port)


async def _delayed(conn: DownstreamProtocol, stream: Stream, route: Route, port: int, delay: float) -> bool:
    await asyncio.sleep(delay)
    if decide_abort(route.fault, conn.randbelow):
        _reply_abort(stream, route.fault)
        return True
    return _forward(conn, stream, route, port)


def _forward(conn: DownstreamProtocol, stream: Stream, route: Route, port: int) -> bool:
    """The router: direct response, redirect, or a destination and the first attempt to it."""
    head = stream.head
    if route.action == ACTION_DIRECT_RESPONSE:
        stream.reply(route.direct_status, route.direct_body, "")
        return True
    if route.action == ACTION_REDIRECT:
        redirect = route.redirect
        assert redirect is not None
        stream.reply(redirect.code, b"", "", ((b"location", redirect.location(head.authority, head.path, head.query)),))
        return True
    dest = route.only or route.pick(head, conn.randbelow)
    cluster = dest.cluster_for(port) if dest.by_port else dest.cluster
    if cluster is None:
        stream.reply(*_reply_args(NO_CLUSTER))
        return True
    stream.cluster = cluster
    if not cluster.endpoints:
        stream.reply(*_reply_args(NO_HEALTHY_UPSTREAM))
        return True
    if not dest.request_headers.empty:
        stream.request_mutation = dest.request_headers
    if not dest.response_headers.empty:  # on top of what the listener and CORS already set
        current = stream.response_mutation
        stream.response_mutation = dest.response_headers if current is None else \
            merge_mutations(current, dest.response_headers)
    if route.mirrors:
        _start_mirrors(conn, stream, route, port)
    state = conn.clusters.state(cluster)
    if state.active_requests >= state.policy.pool.max_requests:  # http2MaxRequests: active requests per cluster
        _reply_overflow(stream)
        return True
    if head.expect_continue and not stream.request_complete:
        conn.write(CONTINUE_100)
    state.active_requests += 1
    stream.cluster_state = state
    retry = route.retry
    stream.retries_left = retry.num_retries
    # The route timeout covers every attempt and back-off; it starts after any fault delay.
    stream.deadline = conn.loop.time() + route.timeout if route.timeout else None
    key = stream.hash_key = state.hash_key(head, conn.peer_ip) if state.policy.hash is not None else None
    stream.avoid_previous = retry.avoid_previous_hosts and key is None  # Istio turns it off with consistent hashing
    return _attempt(conn, stream)


def _attempt(conn: DownstreamProtocol, stream: Stream) -> bool:
    """Start the next attempt: on an idle connection at once, else in a task that connects first."""
    state = stream.cluster_state
    assert state is not None
    stream.attempt += 1
    now = conn.loop.time()
    target = state.only or state.pick(stream.hash_key, stream.tried if stream.avoid_previous else (), conn.random, now)
    if target is None:  # every endpoint ejected
        stream.reply(*_reply_args(NO_HEALTHY_UPSTREAM))
        return True
    endpoint = stream.endpoint = target.endpoint
    stream.tried.append(endpoint)
    if stream.deadline is not None and now >= stream.deadline:
        _finish_timeout(stream, stream.attempt)
        return True
    upstream = conn.pool.reuse(target.pool_key)
    if upstream is None:
        _spawn(conn, stream, _connect, target)
    else:
        _send(conn, stream, upstream, target)
    return False


async def _connect(conn: DownstreamProtocol, stream: Stream, target: EndpointState) -> bool:
    """The attempt needs a new connection (or waits for one within the circuit breaker), then sends."""
    state = stream.cluster_state
    assert state is not None
    loop = conn.loop
    deadline = stream.deadline
    timeout = min(deadline - loop.time(), conn.pool.connect_timeout) if deadline is not None else None
    try:
        upstream = await conn.pool.acquire(state, target, timeout)
    except UpstreamOverflowError:
        _reply_overflow(stream)
        return True
    except UpstreamError as error:
        if isinstance(error, UpstreamTimeoutError) or (deadline is not None and loop.time() >= deadline):
            _finish_timeout(stream, stream.attempt)
            return True
        state.report(target, 0, loop.time())
        if stream.retrying:
            state.active_retries -= 1
            stream.retrying = False
        retry = stream.route.retry  # type: ignore[union-attr]
        if _should_retry(stream, state, retry, CONNECT_FAILURE, False):
            stream.retrying = True
            return _back_off(conn, stream)
        _give_up(stream, retry, stream.attempt, CONNECT_FAILURE, False, error)
        return True
    _send(conn, stream, upstream, target)
    return False


def _send(conn: DownstreamProtocol, stream: Stream, upstream: UpstreamConnection, target: EndpointState) -> None:
    """Write the request on `upstream`; its response comes back through the Stream's sink callbacks."""
    loop = conn.loop
    head = stream.head
    route = stream.route
    assert route is not None
    stream.upstream = upstream
    stream.target = target
    target.active += 1
    upstream.attach(stream, stream.head_only, head.chunked)
    now = loop.time()
    deadline = stream.deadline
    per_try = route.retry.per_try_timeout
    if per_try is not None and (deadline is None or now + per_try < deadline):
        stream.timer = loop.call_at(now + per_try, stream.on_timeout, True)
    elif deadline is not None:
        stream.timer = loop.call_at(deadline, stream.on_timeout, False)
    body = stream.sent + stream.pending if stream.sent else stream.pending
    stream.sent = body if stream.replayable else []
    stream.pending = []
    stream.pending_size = 0
    stream.sent_at = now
    upstream.write(request_head_bytes(stream, head, stream.attempt, deadline, now))
    for data in body:
        upstream.write_body(data)
    if conn.read_paused & READ_PAUSED_BY_BUFFER:
        conn.resume_reading(READ_PAUSED_BY_BUFFER)
    if stream.request_complete and head.chunked:
        upstream.end_body()


def attempt_over(stream: Stream, outcome: UpstreamError | None) -> None:
    """The attempt in flight ended (None: its response went downstream whole): finish, or retry (never raises)."""
    upstream = stream.upstream
    if upstream is None:
        return  # already over: a late timer or a second report
    conn = stream.conn
    try:
        stream.upstream = None
        upstream.sink = None
        if stream.timer is not None:
            stream.cancel_timers()
        target = stream.target
        state = stream.cluster_state
        assert target is not None and state is not None
        target.active -= 1
        if stream.retrying:
            state.active_retries -= 1
            stream.retrying = False
        if outcome is None:
            if state.policy.outlier is not None:
                state.report(target, stream.status, conn.loop.time())
            if stream.request_complete:
                conn.pool.release(upstream)
            else:  # answered before the request body ended: the connection still owes the rest, never reused
                conn.pool.discard(upstream)
            finished = True
        else:
            state.report(target, outcome.status if isinstance(outcome, RetriableResponse) else 0, conn.loop.time())
            conn.pool.discard(upstream)
            finished = _after_failure(conn, stream, upstream, outcome)
    except Exception:  # noqa: BLE001  # as in start(); called from the upstream's callbacks and timers
        _failed(conn, stream)
        return
    if finished:
        _end(conn, stream)


def _after_failure(conn: DownstreamProtocol, stream: Stream, upstream: UpstreamConnection,
                   outcome: UpstreamError) -> bool:
    """An attempt that sent its request failed: retry (True if a reply was made instead)."""
    if stream.response_started:  # bytes went downstream: never pretend the response was complete
        stream.flags.append(outcome.flag if not isinstance(outcome, RetriableResponse) else UC)
        stream.close_after = True
        conn.reset_after_write()
        return True
    state = stream.cluster_state
    route = stream.route
    assert state is not None and route is not None
    retry = route.retry
    if isinstance(outcome, RetriableResponse):
        stream.retrying = True  # the retry slot was taken when the response was judged retriable
        return _back_off(conn, stream)
    if isinstance(outcome, UpstreamTimeoutError) and not outcome.per_try:
        _finish_timeout(stream, stream.attempt)
        return True
    kind = PER_TRY_TIMEOUT if isinstance(outcome, UpstreamTimeoutError) else RESET
    if kind == RESET and upstream.reused and upstream.served and stream.second_chance and stream.replayable \
            and stream.head.method in IDEMPOTENT:
        stream.second_chance = False  # the server closed a kept-alive connection as we used it: a free retry
        stream.tried.pop()
        stream.attempt -= 1
        return _attempt(conn, stream)
    if _should_retry(stream, state, retry, kind, True):
        stream.retrying = True
        return _back_off(conn, stream)
    _give_up(stream, retry, stream.attempt, kind, True, outcome)
    return True


def _cors(stream: Stream, cors: CorsPolicy) -> bool:
    """Envoy's cors filter (before faults and the router); True when it answered a preflight itself."""
    head = stream.head
    origin = head.header(CORS_ORIGIN)
    if origin is None:
        return False
    preflight = head.method == b"OPTIONS" and head.header(CORS_REQUEST_METHOD) is not None
    if cors.allowed(origin):
        if preflight:
            stream.reply(200, b"", "", cors.preflight_reply(origin))
            return True
        added = HeaderMutation(set=cors.response_headers(origin))
        current = stream.response_mutation
        stream.response_mutation = added if current is None else merge_mutations(current, added)
        return False
    if preflight and not cors.forward_unmatched_preflight:
        stream.reply(200, b"", "")
        return True
    return False


MIRROR_TIMEOUT: Final = 30.0  # a shadow request never outlives this, whatever the mirror does


def _start_mirrors(conn: DownstreamProtocol, stream: Stream, route: Route, port: int) -> None:
    """Fire-and-forget copies (mirrorPercentage dice per mirror): they never delay or fail the request."""
    for mirror in route.mirrors:
        if mirror.per_million < MILLION and conn.randbelow(MILLION) >= mirror.per_million:
            continue
        cluster = mirror.destination.cluster_for(port)
        if cluster is None or not cluster.endpoints:
            continue
        task = conn.loop.create_task(_mirror(conn, stream, cluster))
        MIRRORS.add(task)
        task.add_done_callback(MIRRORS.discard)


MIRRORS: set[asyncio.Task[None]] = set()  # strong references: a running mirror is not garbage-collected


class _MirrorSink(ResponseSink):
    """Swallows the shadow response; only its end (or failure) matters."""

    __slots__ = ("done",)

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done

    def on_response_head(self, *_: object) -> None:
        pass

    def on_response_body(self, data: bytes) -> None:
        pass

    def flush(self) -> None:
        pass

    def on_response_end(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def on_upstream_error(self, error: UpstreamError) -> None:
        if not self.done.done():
            self.done.set_exception(error)

    def pause_upstream_writes(self) -> None:
        pass

    def resume_upstream_writes(self) -> None:
        pass


async def _mirror(conn: DownstreamProtocol, stream: Stream, cluster: Cluster) -> None:
    head = stream.head
    try:
        async with asyncio.timeout(MIRROR_TIMEOUT):
            while not stream.request_complete and stream.replayable:  # the copy needs the whole body
                if stream.ended:
                    return  # the request was abandoned before its body ended: nothing to copy
                await asyncio.sleep(0.01)
            if not stream.replayable:
                log.debug("mirror of %r skipped: body larger than the retry buffer", head.target)
                return
            body = b"".join(stream.sent) + b"".join(stream.pending)
            state = conn.clusters.state(cluster)
            target = state.pick(None, (), conn.random, conn.loop.time())
            if target is None:
                return
            upstream = await conn.pool.acquire(state, target)
            done: asyncio.Future[None] = conn.loop.create_future()
            upstream.attach(_MirrorSink(done), head.method == b"HEAD", head.chunked)
            upstream.write(request_head_bytes(stream, head, 1, shadow=cluster))
            if body:
                upstream.write_body(body)
            upstream.end_body()
            try:
                await done
            except BaseException:
                conn.pool.discard(upstream)
                raise
            conn.pool.release(upstream)
    except (UpstreamError, TimeoutError, OSError) as exc:
        log.debug("mirror of %r to %s failed: %s", head.target, cluster.name, exc)


def _should_retry(stream: Stream, state: ClusterState, retry: RetryPolicy, kind: int, request_sent: bool) -> bool:
    """An attempt got no response: retry if retries are left, the body can be replayed, the policy and budget agree."""
    return stream.retries_left > 0 and (stream.replayable or not request_sent) \
        and should_retry_failure(retry, kind, request_sent) and _retry_allowed(stream, state)


def _give_up(stream: Stream, retry: RetryPolicy, attempt: int, kind: int, request_sent: bool,
             error: UpstreamError) -> None:
    """Answer with the last failure; URX when retries ran out (or were never possible for a retriable failure)."""
    if attempt > 1 or (retry.num_retries and should_retry_failure(retry, kind, request_sent)):
        stream.flags.append(URX)
    stream.reply(error.status, error.body(attempt > 1), error.flag)


def _retry_allowed(stream: Stream, state: ClusterState) -> bool:
    """Take a retry slot (maxRetries, retryBudget); a refused retry marks UO, as Envoy's retry overflow."""
    if state.retry_allowed():
        state.active_retries += 1
        return True
    if UO not in stream.flags:
        stream.flags.append(UO)
    return False


def _reply_overflow(stream: Stream) -> None:
    error = UpstreamOverflowError()
    stream.reply(error.status, error.body(False), error.flag, OVERLOADED_HEADER)


IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})


def _back_off(conn: DownstreamProtocol, stream: Stream) -> bool:
    """Spend one retry and wait its jittered back-off in a task, then attempt again; if the route timeout ends
    first, wait for it and answer 504 instead."""
    route = stream.route
    assert route is not None
    stream.retries_left -= 1
    wait = backoff(route.retry, stream.attempt, conn.random)
    deadline = stream.deadline
    if deadline is not None and conn.loop.time() + wait >= deadline:
        _spawn(conn, stream, _time_out_at, deadline)
    else:
        _spawn(conn, stream, _retry_after, wait)
    return False


async def _retry_after(conn: DownstreamProtocol, stream: Stream, wait: float) -> bool:
    await asyncio.sleep(wait)
    return _attempt(conn, stream)


async def _time_out_at(conn: DownstreamProtocol, stream: Stream, deadline: float) -> bool:
    await asyncio.sleep(max(0.0, deadline - conn.loop.time()))
    _finish_timeout(stream, stream.attempt)
    return True


def _finish_timeout(stream: Stream, attempt: int) -> None:
    error = UpstreamTimeoutError()
    stream.reply(error.status, error.body(attempt > 1), error.flag)


def _reply_abort(stream: Stream, fault: FaultPolicy) -> None:
    stream.flags.append(FI)
    if fault.abort_grpc_status:
        code = str(GRPC_CODES.get(fault.abort_grpc_status, 2)).encode()
        stream.reply(200, b"", "", ((b"content-type", b"application/grpc"), (b"grpc-status", code),
                                    (b"grpc-message", FAULT_ABORT_BODY)))
    else:
        stream.reply(fault.abort_status, FAULT_ABORT_BODY, "")


def _reply_args(reply: Reply) -> tuple[int, bytes, str]:
    return reply.status, reply.body, reply.flag
