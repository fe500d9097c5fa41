"""One request, top to bottom, as in DESIGN.md's diagram; protocol-neutral: no wire format is written here.

`Stream` is the per-request state both sides talk to: the downstream transport feeds it the request body, the
upstream connection feeds it the response (as a `ResponseSink`), and it hands the response to the downstream
transport as it arrives (`send_response_head`/`_body`/`_end`, then `flush` after each upstream read: one write),
with backpressure both ways. The codecs (`http1/`) turn those calls into bytes. A Stream is also the record of
the exchange (`StreamInfo`) that telemetry reads when it is over.

The functions below make the decisions (route, local replies, attempts, retries). They run as callbacks,
synchronously, from the moment a request head is parsed to the end of its response; a task carries on only across
a wait (a fault delay, a connect, a retry back-off), so a request served on a kept-alive upstream connection costs
no task, no future and no task switch. Read top to bottom: `start` -> `_route` (CORS, faults) -> `_forward`
(router: direct response, redirect, destination, circuit breaker, mirrors) -> `_attempt` (endpoint, connection)
-> `_send` (request head and body) -> the response callbacks -> `attempt_over` (done, or `_after_failure`: retry
with back-off, or give up with Envoy's reply) -> `_end`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Final

from ..http2.grpc import MessageCounter
from ..messages import HeaderBlock, HeaderTemplate, RequestHead, block_pairs
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
from ..routing.table import RouteTable
from ..security.policy import NO_POLICY, RequestPolicy, Verdict
from ..stream_info import DC, DI, FI, UO, URX, ConnectionInfo, StreamInfo
from .balancer import ClusterState, EndpointState
from .downstream import Connection, ListenerContext
from .fault import GRPC_CODES, MILLION, decide_abort, decide_delay
from .local_reply import (
    DIRECT_RESPONSE,
    DOWNSTREAM_DISCONNECT,
    FAULT_ABORT,
    FAULT_ABORT_BODY,
    INTERNAL_ERROR,
    NO_CLUSTER,
    NO_HEALTHY_UPSTREAM,
    NO_ROUTE,
    OVERLOADED_HEADER,
    RefusedStreamError,
    Reply,
    RetriableResponse,
    UpstreamError,
    UpstreamOverflowError,
    UpstreamTimeoutError,
    jwt_denied,
    rbac_denied,
)
from .retry import (
    CONNECT_FAILURE,
    PER_TRY_TIMEOUT,
    REFUSED,
    RESET,
    backoff,
    holds_for_trailers,
    retriable_grpc_status,
    should_retry_failure,
    should_retry_response,
)
from .upstream import ResponseSink, UpstreamStream

log = logging.getLogger("meshproxy.exchange")

READ_PAUSED_BY_UPSTREAM: Final = 1
READ_PAUSED_BY_BUFFER: Final = 2
PENDING_BODY_LIMIT: Final = 1 << 20  # request body held while connecting; above it, stop reading the client
RETRIABLE_HEADER_NAMES: Final = b"x-envoy-retriable-header-names"  # request header naming retriable response headers
RETRY_BUFFER_LIMIT: Final = 64 * 1024  # request bodies up to this size are kept for a retry (Envoy buffers for replay)
UPSTREAM_SERVICE_TIME: Final = b"x-envoy-upstream-service-time"
FORWARDED_FOR: Final = b"x-forwarded-for"
FORWARDED_PROTO: Final = b"x-forwarded-proto"
ATTEMPT_COUNT: Final = b"x-envoy-attempt-count"
EXPECTED_TIMEOUT: Final = b"x-envoy-expected-rq-timeout-ms"
HTTP: Final = b"http"
# The headers every upstream request gets (x-forwarded-proto when the client sent none, the expected timeout when
# the route has one), as one block each: a codec encodes a template once (messages.HeaderTemplate).
# A gateway's listener puts x-forwarded-for (the client appended to it) before them, a block of its own.
FORWARDED: Final = HeaderTemplate((ATTEMPT_COUNT,))
FORWARDED_HTTP: Final = HeaderTemplate((FORWARDED_PROTO, ATTEMPT_COUNT))
FORWARDED_TIMEOUT: Final = HeaderTemplate((ATTEMPT_COUNT, EXPECTED_TIMEOUT))
FORWARDED_HTTP_TIMEOUT: Final = HeaderTemplate((FORWARDED_PROTO, ATTEMPT_COUNT, EXPECTED_TIMEOUT))
FORWARDED_FOR_BLOCK: Final = HeaderTemplate((FORWARDED_FOR,))
ORIGINAL_PATH_BLOCK: Final = HeaderTemplate((ORIGINAL_PATH,))
SERVICE_TIME: Final = HeaderTemplate((UPSTREAM_SERVICE_TIME,))
GRPC_TIMEOUT: Final = b"grpc-timeout"
CONNECTION: Final = b"connection"
UPGRADE: Final = b"upgrade"
WEBSOCKET: Final = b"websocket"
GRPC_TIMEOUT_NAME: Final = frozenset({GRPC_TIMEOUT})
UPGRADE_BLOCK: Final = HeaderTemplate((CONNECTION, UPGRADE))  # a WebSocket upgrade, asked again upstream
GRPC_TIMEOUT_BLOCK: Final = HeaderTemplate((GRPC_TIMEOUT,))
NO_EXTRA: Final[tuple[tuple[bytes, bytes], ...]] = ()


class Downstream(Connection):
    """A downstream connection as the exchange sees it, whatever its wire protocol: the seam a codec's transport
    plugs into (HTTP/1.1's is `listener.DownstreamProtocol`; an HTTP/2 transport would serve many streams on one
    connection). The exchange calls only what is declared here, passing the stream, and never sees bytes. A
    stream's response is handed over as a head, body chunks and an end, then `flush` after each upstream read
    (one write); a local reply is made whole by the transport. Reading pauses are counted by reason bits."""

    __slots__ = ("ctx", "loop", "pool", "clusters", "random", "randbelow", "telemetry", "strip_request",
                 "appends_forwarded_for", "active_task", "read_paused")

    def __init__(self, ctx: ListenerContext, loop: asyncio.AbstractEventLoop) -> None:
        self.ctx = ctx
        self.loop = loop  # passed in: get_running_loop() is a getpid system call on 3.11, too dear per HTTP/2 stream
        self.pool = ctx.pool  # what the exchange reads, as plain attributes (ctx.draining and ctx.table change)
        self.clusters = ctx.clusters
        self.random = ctx.rng
        self.randbelow = ctx.randbelow
        assert ctx.telemetry is not None
        self.telemetry = ctx.telemetry
        self.strip_request = ctx.strip_request
        self.appends_forwarded_for = ctx.limits.appends_forwarded_for
        self.active_task: asyncio.Task[None] | None = None  # the exchange's task while it waits, if any
        self.read_paused = 0

    def send_response_head(self, stream: Stream, status: int, headers: list[tuple[bytes, bytes]],
                           extra: list[HeaderBlock], content_length: int | None, end_stream: bool) -> None:
        raise NotImplementedError

    def send_response_body(self, data: bytes) -> None:
        raise NotImplementedError

    def send_response_end(self) -> None:
        raise NotImplementedError

    def send_response_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        """The response ends with trailers; HTTP/1.1 drops them (Envoy's default, without enable_trailers)."""
        self.send_response_end()

    def flush(self) -> None:
        raise NotImplementedError

    def send_local_reply(self, stream: Stream, status: int, body: bytes, extra: tuple[tuple[bytes, bytes], ...]) -> None:
        raise NotImplementedError

    def send_continue(self, stream: Stream) -> None:
        raise NotImplementedError

    def reset_stream(self, stream: Stream) -> None:
        """The response was cut short: the client must not take it for complete."""
        raise NotImplementedError

    def pause_reading(self, reason: int) -> None:
        raise NotImplementedError

    def resume_reading(self, reason: int) -> None:
        raise NotImplementedError

    def stream_done(self, stream: Stream) -> None:
        """The exchange is over (response written, replied, or abandoned): record it and go on."""
        raise NotImplementedError


class Stream(StreamInfo, ResponseSink):
    """Per-request state shared by the downstream transport and the upstream connection. It is the exchange's
    record too (`StreamInfo`, what telemetry reads, as Envoy's ActiveStream holds its StreamInfo): one object per
    request, not two."""

    __slots__ = (
        "conn", "pending", "pending_size", "request_complete", "upstream", "response_started",
        "response_complete", "request_mutation", "response_mutation", "sent", "replayable", "retries_left", "timer",
        "sent_at", "upstream_extra", "cluster_state", "downstream_extra", "target", "tried", "deadline", "hash_key",
        "avoid_previous", "retrying", "second_chance", "ended", "request_trailers", "grpc_timeout",
    )

    def __init__(self, conn: Downstream, head: RequestHead, connection: ConnectionInfo, start: float) -> None:
        super().__init__(head, connection, start)
        self.conn = conn
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.request_complete = False
        self.upstream: UpstreamStream | None = None  # the attempt in flight, if any
        self.response_started = False
        self.response_complete = False
        self.request_mutation: HeaderMutation | None = None
        self.response_mutation: HeaderMutation | None = None
        self.sent: list[bytes] = []  # body bytes written to the current attempt, kept for a retry
        self.replayable = True  # false once the body outgrew RETRY_BUFFER_LIMIT: no retry after sending
        self.retries_left = 0
        self.timer: asyncio.TimerHandle | None = None
        self.sent_at = 0.0
        self.upstream_extra: list[HeaderBlock] = []  # added upstream: request id, trace (propagation)
        self.downstream_extra: tuple[HeaderBlock, ...] = ()  # added to the response (telemetry)
        self.cluster_state: ClusterState | None = None
        # Attempts (see _forward and _attempt): their endpoint, count, and the retry state across them.
        self.target: EndpointState | None = None
        self.tried: list[Endpoint] = []
        self.deadline: float | None = None  # the route timeout, as loop time
        self.hash_key: int | None = None
        self.avoid_previous = False
        self.retrying = False  # holds a retry slot of the cluster (maxRetries, retry budget)
        self.second_chance = conn.ctx.retry_reused  # one free retry when a reused connection turns out closed
        self.ended = False
        self.request_trailers: list[tuple[bytes, bytes]] | None = None
        self.grpc_timeout = 0.0  # a gRPC request's grpc-timeout, seconds (its transport reads it); 0: none

    # ---- request body, from the downstream transport

    def on_request_body(self, data: bytes) -> None:
        self.body_size += len(data)
        if self.replayable and self.body_size > RETRY_BUFFER_LIMIT:
            self.replayable = False
            self.sent = []
        upstream = self.upstream
        if upstream is not None:
            upstream.send_body(data)
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

    def on_request_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        self.request_complete = True
        self.request_trailers = trailers  # kept for a retry
        if self.upstream is not None:
            self.upstream.send_trailers(trailers)

    # ---- response, from the upstream connection (ResponseSink)

    def on_response_head(self, status: int, headers: list[tuple[bytes, bytes]], content_length: int | None,
                         end_stream: bool) -> None:
        route = self.route
        retry = route.retry if route is not None else NO_RETRY
        if retry.num_retries and should_retry_response(
                retry, status, headers,
                self.head.header(RETRIABLE_HEADER_NAMES) if retry.retry_on & RETRY_ON_RETRIABLE_HEADERS else None):
            if self.retries_left > 0 and self.replayable and self.cluster_state is not None \
                    and _retry_allowed(self, self.cluster_state):
                attempt_over(self, RetriableResponse(status))  # discarded: the exchange retries
                return
            self.flags |= URX  # retries exhausted: the last upstream answer goes to the client
        elif retry.grpc_trailers_bytes and not end_stream and _hold(self, retry, status, headers, content_length):
            return  # held until its trailers say whether to retry (meshproxy.io/retry-grpc-trailers)
        self.status = status
        self.response_started = True
        conn = self.conn
        if conn.telemetry.reads_response:
            headers = conn.telemetry.on_response(self, headers)
        mutation = self.response_mutation
        if mutation is not None:
            headers = apply_mutation(headers, mutation)
        extra: list[HeaderBlock] = [(SERVICE_TIME, (b"%d" % int((conn.loop.time() - self.sent_at) * 1000),))]
        if self.downstream_extra:
            extra += self.downstream_extra
        conn.send_response_head(self, status, headers, extra, content_length, end_stream)

    def on_response_body(self, data: bytes) -> None:
        self.response_bytes += len(data)
        self.conn.send_response_body(data)

    def flush(self) -> None:
        """Write what the last upstream read produced, in one call (the upstream calls this after each read), and
        finish the attempt if its response ended: after the read, so bytes after the response, in the same read,
        are judged on this connection before it goes back to the pool."""
        self.conn.flush()
        if self.response_complete and self.upstream is not None:
            attempt_over(self, None)

    def on_response_end(self) -> None:
        self.conn.send_response_end()
        self.response_complete = True

    def on_response_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        self.conn.send_response_trailers(trailers)
        self.response_complete = True

    def on_upstream_error(self, error: UpstreamError) -> None:
        attempt_over(self, error)

    def on_timeout(self, per_try: bool) -> None:
        self.timer = None
        attempt_over(self, UpstreamTimeoutError(per_try))

    def cancel_timers(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def pause_upstream_writes(self) -> None:
        self.conn.pause_reading(READ_PAUSED_BY_UPSTREAM)

    def resume_upstream_writes(self) -> None:
        self.conn.resume_reading(READ_PAUSED_BY_UPSTREAM)

    def pause_upstream_reads(self) -> None:
        """The client reads slower than the upstream answers: stop reading the upstream."""
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_upstream_reads(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    # ---- replies made here

    def reply(self, status: int, body: bytes, flag: int, details: str,
              extra: tuple[tuple[bytes, bytes], ...] = NO_EXTRA) -> None:
        self.status = status
        self.flags |= flag
        self.details = details
        self.response_started = True
        self.response_complete = True
        self.conn.send_local_reply(self, status, body, extra + tuple(block_pairs(self.downstream_extra))
                                   if self.downstream_extra else extra)

    def reply_with(self, reply: Reply) -> None:
        self.reply(reply.status, reply.body, reply.flag, reply.details)


def apply_mutation(headers: list[tuple[bytes, bytes]], mutation: HeaderMutation) -> list[tuple[bytes, bytes]]:
    """Envoy's order: remove, then set (replace all values), then add (append)."""
    drop = mutation.remove | {name for name, _ in mutation.set}
    out = [(n, v) for n, v in headers if n not in drop] if drop else list(headers)
    out += mutation.set
    out += mutation.add
    return out


def shadow_authority(authority: bytes) -> bytes:
    """Envoy's mirror host: `-shadow` after the host name, before any port."""
    host, sep, port = authority.rpartition(b":")
    if sep and port.isdigit():
        return host + b"-shadow:" + port
    return authority + b"-shadow"


def send_request_head(stream: Stream, upstream: UpstreamStream, attempt: int, deadline: float | None = None,
                      now: float = 0.0, shadow: Cluster | None = None) -> None:
    """The upstream request head: rewritten as the route says; the client's headers less hop-by-hop ones and those
    the proxy sets (`conn.strip_request`), then the proxy's own (x-forwarded-*, trace and peer headers, attempt
    count, expected timeout). The codec frames it, in one pass over the client's headers."""
    conn = stream.conn
    head = stream.head
    upgrade: HeaderBlock | None = None
    if head.connection_tokens:
        drop = conn.strip_request | head.connection_tokens
        if UPGRADE in head.connection_tokens:  # a WebSocket upgrade (the codec refuses others) asks it again
            protocol = head.header(UPGRADE)
            if protocol is not None and protocol.lower() == WEBSOCKET:
                upgrade = (UPGRADE_BLOCK, (UPGRADE, protocol))
    else:
        drop = conn.strip_request
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
    xff = None
    has_proto = False
    for name, value in headers:
        if name == FORWARDED_FOR:
            xff = value
        elif name == FORWARDED_PROTO:
            has_proto = True
    count = b"%d" % attempt
    block: HeaderBlock
    if deadline is None:
        block = (FORWARDED, (count,)) if has_proto else (FORWARDED_HTTP, (HTTP, count))
    else:
        timeout = b"%d" % max(0, int((deadline - now) * 1000))
        block = (FORWARDED_TIMEOUT, (count, timeout)) if has_proto else (FORWARDED_HTTP_TIMEOUT, (HTTP, count, timeout))
    extra: list[HeaderBlock] = [block]
    if conn.appends_forwarded_for:  # a gateway; a sidecar passed the client's x-forwarded-for on as it came
        peer = stream.connection.peer_ip
        extra.insert(0, (FORWARDED_FOR_BLOCK, ((xff + b", " + peer) if xff else peer,)))
    if original_path is not None:
        extra.append((ORIGINAL_PATH_BLOCK, (original_path,)))
    if stream.upstream_extra:
        extra += stream.upstream_extra
    peer_headers = conn.telemetry.request_peer_headers
    if peer_headers:
        cluster = shadow or stream.cluster
        if cluster is None or not cluster.external:  # Istio never gives peer metadata to a MESH_EXTERNAL service
            extra += peer_headers
    if deadline is not None and stream.grpc_timeout:  # the upstream learns the time left, capped by the route timeout
        drop = drop | GRPC_TIMEOUT_NAME
        extra.append((GRPC_TIMEOUT_BLOCK, (b"%dm" % max(0, int((deadline - now) * 1000)),)))
    if upgrade is not None:
        extra.append(upgrade)
    no_body = head.content_length is None and not head.chunked
    upstream.send_head(head.method, path, authority, headers, drop, extra,
                       None if head.chunked else head.content_length, no_body)

def start(conn: Downstream, stream: Stream) -> None:
    """Begin a request's exchange; the downstream transport calls this for each request in turn (never raises).

    It runs synchronously, from the codec's callback, as far as it can: routing, local replies and, when an idle
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


def _spawn(conn: Downstream, stream: Stream, step: Callable[..., Awaitable[bool]], *args: object) -> None:
    """Continue the exchange in a task, `step(conn, stream, *args)`; the transport cancels it if the client goes
    away or times out. (The step's coroutine is made in the task: a task cancelled before it ran leaves none.)"""
    conn.active_task = conn.loop.create_task(_run(conn, stream, step, args))


async def _run(conn: Downstream, stream: Stream, step: Callable[..., Awaitable[bool]],
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


def abandon(conn: Downstream, stream: Stream) -> None:
    """The transport stopped the exchange (client gone, stream idle timeout, bad request body)."""
    stream.flags |= DC  # the transport replaces it when it knows a better reason
    stream.details = DOWNSTREAM_DISCONNECT
    _drop_upstream(conn, stream)
    _end(conn, stream)


def _failed(conn: Downstream, stream: Stream) -> None:
    """A bug met on this request: the process must survive anything a peer can make happen."""
    head = stream.head
    log.exception("exchange failed for %s %r", head.method, head.target)
    try:
        _drop_upstream(conn, stream)
        if not stream.response_started:
            stream.reply_with(INTERNAL_ERROR)
        else:
            conn.reset_stream(stream)
    finally:
        _end(conn, stream)


def _end(conn: Downstream, stream: Stream) -> None:
    """The one way a stream finishes: counters back, then the transport writes the access log and goes on."""
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


def _drop_upstream(conn: Downstream, stream: Stream) -> None:
    upstream = stream.upstream
    if upstream is not None:
        stream.upstream = None
        upstream.sink = None
        if stream.target is not None:
            stream.target.active -= 1
        upstream.discard()


def _route(conn: Downstream, stream: Stream) -> bool:
    """Authorize, route and apply the route's filters; True when the request was answered here."""
    table = conn.ctx.table  # one read of the table: a reload never changes this request
    policy = table.policy
    if policy is not NO_POLICY:  # the only cost of security when no policy applies
        verdict = _check(stream, policy)
        if verdict is not None:
            if verdict.waiting_for is not None:  # a token's keys are being fetched for the first time
                _spawn(conn, stream, _after_jwks, table, policy, verdict.waiting_for.pending)
                return False
            _reply_refused(stream, verdict)
            return True
    return _match(conn, stream, table)


def _check(stream: Stream, policy: RequestPolicy) -> Verdict | None:
    """JWT authentication, then authorization (Envoy's jwt_authn and rbac filters, before the router); None: go on."""
    connection = stream.connection
    return policy.check(stream.head, connection.peer_ip, connection.peer_principal,
                        _local_ip(connection) if policy.authz is not None and policy.authz.needs_local_ip else "",
                        connection.requested_server_name)  # connection.sni: the TLS connection's SNI


def _reply_refused(stream: Stream, verdict: Verdict) -> None:
    if verdict.failure is not None:
        head = stream.head
        proto = head.header(FORWARDED_PROTO) or b"http"  # Envoy's buildOriginalUri: the path cut at 256 bytes
        reply, extra = jwt_denied(verdict.status, verdict.failure.message, verdict.failure.details,
                                  proto + b"://" + head.authority + head.path_and_query[:256])
        stream.reply(reply.status, reply.body, reply.flag, reply.details, extra)
    else:
        assert verdict.decision is not None
        stream.reply_with(rbac_denied(verdict.decision.policy_id))


async def _after_jwks(conn: Downstream, stream: Stream, table: RouteTable, policy: RequestPolicy,
                      pending: asyncio.Future[None] | None) -> bool:
    """A token's keys were being fetched for the first time: check again once they are in, then route."""
    from ..security.jwt_authn import JWKS_FETCH_FAILED, Failure  # loaded with the policy, already

    if pending is not None:
        await asyncio.shield(pending)  # shared by every request waiting for it: a client that leaves cancels none
    verdict = _check(stream, policy)
    if verdict is not None:
        if verdict.waiting_for is not None:  # a second fetch started meanwhile: never wait twice
            verdict = Verdict(401, failure=Failure(401, JWKS_FETCH_FAILED))
        _reply_refused(stream, verdict)
        return True
    return _match(conn, stream, table)


def _local_ip(connection: ConnectionInfo) -> str:
    host, _, _ = connection.log_addresses()[0].rpartition(":")
    return host.strip("[]")


def _match(conn: Downstream, stream: Stream, table: RouteTable) -> bool:
    route, port = table.match(stream.head)
    if route is None:
        stream.reply_with(NO_ROUTE)
        return True
    stream.route = route
    if route.cors is not None and _cors(stream, route.cors):
        return True  # a preflight answered here
    # Fault filter: before routing to the upstream, in the caller's proxy.
    fault = route.fault
    if fault.active:
        delay = decide_delay(fault, conn.randbelow)
        if delay:
            stream.flags |= DI
            _spawn(conn, stream, _delayed, route, port, delay)
            return False
        if decide_abort(fault, conn.randbelow):
            _reply_abort(stream, fault)
            return True
    return _forward(conn, stream, route, port)


async def _delayed(conn: Downstream, stream: Stream, route: Route, port: int, delay: float) -> bool:
    await asyncio.sleep(delay)
    if decide_abort(route.fault, conn.randbelow):
        _reply_abort(stream, route.fault)
        return True
    return _forward(conn, stream, route, port)


def _forward(conn: Downstream, stream: Stream, route: Route, port: int) -> bool:
    """The router: direct response, redirect, or a destination and the first attempt to it."""
    head = stream.head
    if route.action == ACTION_DIRECT_RESPONSE:
        stream.reply(route.direct_status, route.direct_body, 0, DIRECT_RESPONSE)
        return True
    if route.action == ACTION_REDIRECT:
        redirect = route.redirect
        assert redirect is not None
        stream.reply(redirect.code, b"", 0, DIRECT_RESPONSE,
                     ((b"location", redirect.location(head.authority, head.path, head.query)),))
        return True
    dest = route.only or route.pick(head, conn.randbelow)
    cluster = dest.cluster_for(port) if dest.by_port else dest.cluster
    if cluster is None:
        stream.reply_with(NO_CLUSTER)
        return True
    if not cluster.endpoints:
        original = stream.connection.original_destination if cluster.original_destination else None
        if original is None:
            stream.cluster = cluster
            stream.reply_with(NO_HEALTHY_UPSTREAM)
            return True
        cluster = conn.clusters.original_destination(cluster, original)  # PassthroughCluster: where it was going
    stream.cluster = cluster
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
        conn.send_continue(stream)
    state.active_requests += 1
    stream.cluster_state = state
    retry = route.retry
    stream.retries_left = retry.num_retries
    # The route timeout covers every attempt and back-off; it starts after any fault delay. A gRPC request's
    # grpc-timeout shortens it (Istio sets Envoy's grpc_timeout_header_max to the route timeout).
    timeout = route.timeout
    if stream.grpc_timeout:
        timeout = min(timeout, stream.grpc_timeout) if timeout else stream.grpc_timeout
    now = conn.loop.time()
    stream.deadline = now + timeout if timeout else None
    key = stream.hash_key = state.hash_key(head, stream.connection.peer_ip) if state.policy.hash is not None else None
    stream.avoid_previous = retry.avoid_previous_hosts and key is None  # Istio turns it off with consistent hashing
    return _attempt(conn, stream, now)


def _attempt(conn: Downstream, stream: Stream, now: float) -> bool:
    """Start the next attempt (`now`: the loop's time): on an idle connection at once, else in a task that connects
    first."""
    state = stream.cluster_state
    assert state is not None
    stream.attempts += 1
    target = state.only or state.pick(stream.hash_key, stream.tried if stream.avoid_previous else (), conn.random, now)
    if target is None:  # every endpoint ejected
        stream.reply_with(NO_HEALTHY_UPSTREAM)
        return True
    stream.endpoint = target.endpoint
    stream.tried.append(target.endpoint)
    if stream.deadline is not None and now >= stream.deadline:
        _finish_timeout(stream)
        return True
    upstream = conn.pool.reuse(target.pool_key)
    if upstream is None:
        _spawn(conn, stream, _connect, target)
    else:
        _send(conn, stream, upstream, target, now)
    return False


async def _connect(conn: Downstream, stream: Stream, target: EndpointState) -> bool:
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
            _finish_timeout(stream)
            return True
        state.report(target, 0, loop.time())
        if stream.retrying:
            state.active_retries -= 1
            stream.retrying = False
        retry = stream.route.retry  # type: ignore[union-attr]
        if _should_retry(stream, state, retry, CONNECT_FAILURE, False):
            stream.retrying = True
            return _back_off(conn, stream, error.details())
        _give_up(stream, retry, CONNECT_FAILURE, False, error)
        return True
    _send(conn, stream, upstream, target, loop.time())
    return False


def _send(conn: Downstream, stream: Stream, upstream: UpstreamStream, target: EndpointState, now: float) -> None:
    """Send the request on `upstream` (`now`: the loop's time); its response comes back through the Stream's sink
    callbacks."""
    loop = conn.loop
    route = stream.route
    assert route is not None
    stream.upstream = upstream
    stream.target = target
    stream.upstream_principal = upstream.peer_principal  # "" unless mutual TLS (telemetry's destination_principal)
    target.active += 1
    upstream.attach(stream, stream.head.method == b"HEAD")
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
    send_request_head(stream, upstream, stream.attempts, deadline, now)
    for data in body:
        upstream.send_body(data)
    if conn.read_paused & READ_PAUSED_BY_BUFFER:
        conn.resume_reading(READ_PAUSED_BY_BUFFER)
    if stream.request_complete:
        if stream.request_trailers is None:
            upstream.end_body()
        else:
            upstream.send_trailers(stream.request_trailers)


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
                upstream.release()
            else:  # answered before the request body ended: the connection still owes the rest, never reused
                upstream.discard()
            finished = True
        else:
            state.report(target, outcome.status if isinstance(outcome, RetriableResponse) else 0, conn.loop.time())
            upstream.discard()
            finished = _after_failure(conn, stream, upstream, outcome)
    except Exception:  # noqa: BLE001  # as in start(); called from the upstream's callbacks and timers
        _failed(conn, stream)
        return
    if finished:
        _end(conn, stream)


def _after_failure(conn: Downstream, stream: Stream, upstream: UpstreamStream,
                   outcome: UpstreamError) -> bool:
    """An attempt that sent its request failed: retry (True if a reply was made instead)."""
    if stream.response_started:  # bytes went downstream: never pretend the response was complete
        stream.flags |= outcome.flag
        stream.details = outcome.details(started=True)
        conn.reset_stream(stream)
        return True
    state = stream.cluster_state
    route = stream.route
    assert state is not None and route is not None
    retry = route.retry
    if isinstance(outcome, RetriableResponse):
        stream.retrying = True  # the retry slot was taken when the response was judged retriable
        return _back_off(conn, stream, outcome.why)
    if isinstance(outcome, UpstreamTimeoutError) and not outcome.per_try:
        _finish_timeout(stream)
        return True
    kind = PER_TRY_TIMEOUT if isinstance(outcome, UpstreamTimeoutError) else \
        REFUSED if isinstance(outcome, RefusedStreamError) else RESET
    if kind == RESET and upstream.reused and upstream.served and stream.second_chance and stream.replayable \
            and stream.head.method in IDEMPOTENT:
        # The server closed a kept-alive connection as we reused it: one free retry, as Go's transport does (a
        # deliberate difference from Envoy, counted, and off with --no-retry-reused-connection; see the README).
        stream.second_chance = False
        stream.reused_retries += 1
        stream.tried.pop()
        stream.attempts -= 1
        return _attempt(conn, stream, conn.loop.time())
    if _should_retry(stream, state, retry, kind, True):
        stream.retrying = True
        return _back_off(conn, stream, "per_try_timeout" if kind == PER_TRY_TIMEOUT else outcome.details())
    _give_up(stream, retry, kind, True, outcome)
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
            stream.reply(200, b"", 0, DIRECT_RESPONSE, cors.preflight_reply(origin))
            return True
        added = HeaderMutation(set=cors.response_headers(origin))
        current = stream.response_mutation
        stream.response_mutation = added if current is None else merge_mutations(current, added)
        return False
    if preflight and not cors.forward_unmatched_preflight:
        stream.reply(200, b"", 0, DIRECT_RESPONSE)
        return True
    return False


def _hold(stream: Stream, retry: RetryPolicy, status: int, headers: list[tuple[bytes, bytes]],
          content_length: int | None) -> bool:
    """Hold a gRPC response whose status will come in trailers, instead of forwarding it (meshproxy extension,
    opt-in per route): only when the request is whole and kept for a retry (unary calls) and the head fits."""
    upstream = stream.upstream
    if upstream is None or upstream.sink is not stream or not stream.request_complete or not stream.replayable:
        return False  # (a held head being released comes from the holder, the upstream's sink: not held again)
    left = holds_for_trailers(retry, status, headers)
    if not left:
        return False
    upstream.sink = _HeldResponse(stream, retry, status, headers, content_length, left)
    return True


class _HeldResponse(ResponseSink):
    """The upstream's sink while a response is held: its head and DATA are kept, not forwarded, until
    - trailers: a retriable grpc-status retries the attempt (as a retriable response head would; URX when no
      retry is left), any other goes downstream with the held response;
    - the held bytes would pass the bound, the response ends without trailers, or an upstream read ends with the
      first gRPC message whole (a unary server sends its message and status together; a streaming one goes on):
      the held part goes downstream and the stream continues as any other, without retry.
    An upstream failure or a timer meanwhile is an attempt that sent nothing downstream (retried or replied)."""

    __slots__ = ("stream", "retry", "status", "headers", "content_length", "left", "chunks", "messages")

    def __init__(self, stream: Stream, retry: RetryPolicy, status: int, headers: list[tuple[bytes, bytes]],
                 content_length: int | None, left: int) -> None:
        self.stream = stream
        self.retry = retry
        self.status = status
        self.headers = headers
        self.content_length = content_length
        self.left = left  # bytes that may still be held
        self.chunks: list[bytes] = []
        self.messages = MessageCounter()

    def release(self) -> None:
        """Hand the held part downstream; from here the stream gets the upstream's events itself."""
        stream = self.stream
        stream.on_response_head(self.status, self.headers, self.content_length, False)  # judged as before: forwarded
        upstream = stream.upstream
        if upstream is not None:
            upstream.sink = stream
        for data in self.chunks:
            stream.on_response_body(data)
        self.chunks = []

    def on_response_head(self, status: int, headers: list[tuple[bytes, bytes]], content_length: int | None,
                         end_stream: bool) -> None:
        self.release()  # a second head is not for a held response to judge
        self.stream.on_response_head(status, headers, content_length, end_stream)

    def on_response_body(self, data: bytes) -> None:
        self.left -= len(data)
        if self.left < 0:
            self.release()
            self.stream.on_response_body(data)
            return
        self.chunks.append(data)
        self.messages.feed(data)

    def flush(self) -> None:
        if self.messages.first_complete():
            self.release()
            self.stream.flush()

    def on_response_end(self) -> None:
        self.release()
        self.stream.on_response_end()

    def on_response_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        stream = self.stream
        code = retriable_grpc_status(self.retry, trailers)
        if code:
            state = stream.cluster_state
            if stream.retries_left > 0 and state is not None and _retry_allowed(stream, state):
                attempt_over(stream, RetriableResponse(self.status, f"retriable grpc-status {code.decode()} "
                                                                    "in trailers"))
                return
            stream.flags |= URX  # retries exhausted: the last upstream answer goes to the client
        self.release()
        stream.on_response_trailers(trailers)

    def on_upstream_error(self, error: UpstreamError) -> None:
        self.stream.on_upstream_error(error)

    def pause_upstream_writes(self) -> None:
        self.stream.pause_upstream_writes()

    def resume_upstream_writes(self) -> None:
        self.stream.resume_upstream_writes()


MIRROR_TIMEOUT: Final = 30.0  # a shadow request never outlives this, whatever the mirror does


def _start_mirrors(conn: Downstream, stream: Stream, route: Route, port: int) -> None:
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


MIRRORS: Final[set[asyncio.Task[None]]] = set()  # strong references: a running mirror is not garbage-collected


class _MirrorSink(ResponseSink):
    """Swallows the shadow response; only its end (or failure) matters."""

    __slots__ = ("done",)

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done

    def on_response_head(self, status: int, headers: list[tuple[bytes, bytes]], content_length: int | None,
                         end_stream: bool) -> None:
        pass

    def on_response_body(self, data: bytes) -> None:
        pass

    def flush(self) -> None:
        pass

    def on_response_end(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def on_response_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        self.on_response_end()

    def on_upstream_error(self, error: UpstreamError) -> None:
        if not self.done.done():
            self.done.set_exception(error)

    def pause_upstream_writes(self) -> None:
        pass

    def resume_upstream_writes(self) -> None:
        pass


async def _mirror(conn: Downstream, stream: Stream, cluster: Cluster) -> None:
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
            upstream.attach(_MirrorSink(done), head.method == b"HEAD")
            send_request_head(stream, upstream, 1, shadow=cluster)
            if body:
                upstream.send_body(body)
            upstream.end_body()
            try:
                await done
            except BaseException:
                upstream.discard()
                raise
            upstream.release()
    except (UpstreamError, TimeoutError, OSError) as exc:
        log.debug("mirror of %r to %s failed: %s", head.target, cluster.name, exc)


def _should_retry(stream: Stream, state: ClusterState, retry: RetryPolicy, kind: int, request_sent: bool) -> bool:
    """An attempt got no response: retry if retries are left, the body can be replayed, the policy and budget agree."""
    return stream.retries_left > 0 and (stream.replayable or not request_sent) \
        and should_retry_failure(retry, kind, request_sent) and _retry_allowed(stream, state)


def _give_up(stream: Stream, retry: RetryPolicy, kind: int, request_sent: bool, error: UpstreamError) -> None:
    """Answer with the last failure; URX when retries ran out (or were never possible for a retriable failure)."""
    retried = stream.attempts > 1
    if retried or (retry.num_retries and should_retry_failure(retry, kind, request_sent)):
        stream.flags |= URX
    stream.transport_failure = error.transport
    stream.reply(error.status, error.body(retried), error.flag, error.details())


def _retry_allowed(stream: Stream, state: ClusterState) -> bool:
    """Take a retry slot (maxRetries, retryBudget); a refused retry marks UO, as Envoy's retry overflow."""
    if state.retry_allowed():
        state.active_retries += 1
        return True
    stream.flags |= UO
    return False


def _reply_overflow(stream: Stream) -> None:
    error = UpstreamOverflowError()
    stream.reply(error.status, error.body(False), error.flag, error.details(), OVERLOADED_HEADER)


IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})


def _back_off(conn: Downstream, stream: Stream, reason: str) -> bool:
    """Spend one retry and wait its jittered back-off in a task, then attempt again; if the route timeout ends
    first, wait for it and answer 504 instead. `reason` (why the attempt is retried) goes to the record."""
    route = stream.route
    assert route is not None
    try:  # only a retried request has the list (StreamInfo.retry_reasons)
        stream.retry_reasons.append(reason)
    except AttributeError:
        stream.retry_reasons = [reason]
    stream.retries_left -= 1
    wait = backoff(route.retry, stream.attempts, conn.random)
    deadline = stream.deadline
    if deadline is not None and conn.loop.time() + wait >= deadline:
        _spawn(conn, stream, _time_out_at, deadline)
    else:
        _spawn(conn, stream, _retry_after, wait)
    return False


async def _retry_after(conn: Downstream, stream: Stream, wait: float) -> bool:
    await asyncio.sleep(wait)
    return _attempt(conn, stream, conn.loop.time())


async def _time_out_at(conn: Downstream, stream: Stream, deadline: float) -> bool:
    await asyncio.sleep(max(0.0, deadline - conn.loop.time()))
    _finish_timeout(stream)
    return True


def _finish_timeout(stream: Stream) -> None:
    error = UpstreamTimeoutError()
    stream.reply(error.status, error.body(stream.attempts > 1), error.flag, error.details())


def _reply_abort(stream: Stream, fault: FaultPolicy) -> None:
    if fault.abort_grpc_status:
        code = str(GRPC_CODES.get(fault.abort_grpc_status, 2)).encode()
        stream.reply(200, b"", FI, FAULT_ABORT, ((b"content-type", b"application/grpc"), (b"grpc-status", code),
                                                 (b"grpc-message", FAULT_ABORT_BODY)))
    else:
        stream.reply(fault.abort_status, FAULT_ABORT_BODY, FI, FAULT_ABORT)
