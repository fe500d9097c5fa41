"""One request, top to bottom, as in DESIGN.md's diagram: one linear coroutine.

`Stream` is the per-request state both protocols talk to: the downstream side
feeds it request body bytes, the upstream side feeds it the response, and it
writes the response downstream as it arrives (backpressure both ways). The
coroutine `exchange()` makes the decisions: route, local replies, attempts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from ..http1.head import RequestHead
from ..http1.wire import CONTINUE_100, CRLF, HOP_BY_HOP, LAST_CHUNK, chunk, local_reply, status_line
from ..routing.cluster import Cluster, Endpoint
from ..routing.cors import ORIGIN as CORS_ORIGIN
from ..routing.cors import REQUEST_METHOD as CORS_REQUEST_METHOD
from ..routing.cors import CorsPolicy
from ..routing.rewrite import ORIGINAL_PATH
from ..telemetry.peer import PEER_HEADERS
from ..routing.policy import ACTION_DIRECT_RESPONSE, ACTION_REDIRECT, FaultPolicy, HeaderMutation, RetryPolicy, Route
from .balancer import ClusterState
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
from .retry import CONNECT_FAILURE, PER_TRY_TIMEOUT, RESET, backoff, should_retry_failure, should_retry_response
from .upstream import FRAMING_CHUNKED, FRAMING_EOF, FRAMING_LENGTH, UpstreamConnection

if TYPE_CHECKING:
    from .listener import DownstreamProtocol

log = logging.getLogger("meshproxy.exchange")

READ_PAUSED_BY_UPSTREAM = 1
READ_PAUSED_BY_BUFFER = 2
PENDING_BODY_LIMIT = 1 << 20  # request body held while connecting; above it, stop reading the client
RETRIABLE_HEADER_NAMES = b"x-envoy-retriable-header-names"  # request header naming retriable response headers
RETRY_BUFFER_LIMIT = 64 * 1024  # request bodies up to this size are kept for a retry (Envoy buffers for replay)
RESPONSE_HOP_BY_HOP = HOP_BY_HOP


class Stream:
    """Per-request state shared by the downstream and upstream protocols."""

    __slots__ = (
        "conn", "head", "pending", "pending_size", "request_complete", "upstream", "waiter", "response_started",
        "response_chunked", "response_complete", "status", "flags", "start", "response_bytes", "close_after",
        "request_mutation", "response_mutation", "route", "cluster", "endpoint", "head_only", "sent", "replayable",
        "body_size", "retries_left", "timer", "sent_at", "upstream_extra", "request_id", "cluster_state", "out",
        "downstream_extra", "peer", "trace",
    )

    def __init__(self, conn: DownstreamProtocol, head: RequestHead) -> None:
        self.conn = conn
        self.head = head
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.request_complete = False
        self.upstream: UpstreamConnection | None = None
        self.waiter: asyncio.Future[UpstreamError | None] | None = None
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
        self.upstream_extra: list[tuple[bytes, bytes]] = []  # added to the upstream request (telemetry)
        self.request_id: bytes | None = None
        self.cluster_state: ClusterState | None = None
        self.out: list[bytes] = []  # response bytes not yet written downstream (see flush)
        self.downstream_extra: tuple[tuple[bytes, bytes], ...] = ()  # added to the response (telemetry)
        self.peer: bytes | None = None  # the other side's peer metadata header (telemetry)
        self.trace: tuple[bytes, bytes, bytes | None] | None = None  # span ids when sampled (telemetry)

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
        if route is not None and route.retry.num_retries and \
                should_retry_response(route.retry, status, headers, self.head.header(RETRIABLE_HEADER_NAMES)):
            if self.retries_left > 0 and self.replayable and self.cluster_state is not None \
                    and _retry_allowed(self, self.cluster_state):
                self._resolve(RetriableResponse(status))  # discarded: the exchange retries
                if self.upstream is not None:
                    self.upstream.sink = None
                return
            self.flags.append(URX)  # retries exhausted: the last upstream answer goes to the client
        self.status = status
        self.response_started = True
        conn = self.conn
        if conn.telemetry.reads_response:
            headers = conn.telemetry.on_response(self, headers)
        parts = [status_line(status)]
        mutation = self.response_mutation
        if mutation is not None:
            headers = apply_mutation(headers, mutation)
        for name, value in headers:
            if name not in RESPONSE_HOP_BY_HOP:
                parts += [name, b": ", value, CRLF]
        for name, value in self.downstream_extra:
            parts += [name, b": ", value, CRLF]
        if framing == FRAMING_LENGTH:
            parts += [b"content-length: ", str(content_length).encode(), CRLF]
        elif framing == FRAMING_CHUNKED or framing == FRAMING_EOF:
            if self.head.version == b"1.1":
                parts.append(b"transfer-encoding: chunked\r\n")
                self.response_chunked = True
            else:
                self.close_after = True  # HTTP/1.0 client: the body ends when we close
        if self.sent_at:
            parts += [b"x-envoy-upstream-service-time: ", str(int((conn.loop.time() - self.sent_at) * 1000)).encode(),
                      CRLF]
        if conn.draining:
            self.close_after = True
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
        """Write what the last upstream read produced, in one call (the upstream calls this after each read)."""
        out = self.out
        if out:
            self.conn.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def on_response_end(self) -> None:
        if self.response_chunked and not self.head_only:
            self.out.append(LAST_CHUNK)
        self.flush()
        self.response_complete = True
        self._resolve(None)

    def on_upstream_error(self, error: UpstreamError) -> None:
        self._resolve(error)

    def on_timeout(self, per_try: bool) -> None:
        self.timer = None
        self._resolve(UpstreamTimeoutError(per_try))

    def _resolve(self, outcome: UpstreamError | None) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(outcome)

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
        close = self.close_after or self.conn.draining
        self.conn.write(local_reply(status, body, close=close, server=self.conn.server_name,
                                    extra=extra + self.downstream_extra, head_only=self.head_only))


def apply_mutation(headers: list[tuple[bytes, bytes]], mutation: HeaderMutation) -> list[tuple[bytes, bytes]]:
    """Envoy's order: remove, then set (replace all values), then add (append)."""
    drop = mutation.remove | {name for name, _ in mutation.set}
    out = [(n, v) for n, v in headers if n not in drop] if drop else list(headers)
    out += mutation.set
    out += mutation.add
    return out


PROXY_SET_HEADERS = frozenset({b"host", b"x-envoy-attempt-count", b"x-envoy-expected-rq-timeout-ms", ORIGINAL_PATH})


def shadow_authority(authority: bytes) -> bytes:
    """Envoy's mirror host: `-shadow` after the host name, before any port."""
    host, sep, port = authority.rpartition(b":")
    if sep and port.isdigit():
        return host + b"-shadow:" + port
    return authority + b"-shadow"


def request_head_bytes(stream: Stream, head: RequestHead, attempt: int, deadline: float | None = None,
                       now: float = 0.0, shadow: bool = False) -> bytes:
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
    if shadow:
        authority = shadow_authority(authority)
    parts = [head.method, b" ", path, b" HTTP/1.1\r\nhost: ", authority, CRLF]
    if original_path is not None:
        parts += [ORIGINAL_PATH, b": ", original_path, CRLF]
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
        parts += [name, b": ", value, CRLF]
    peer = conn.peer_ip
    parts += [b"x-forwarded-for: ", (xff + b", " + peer) if xff else peer, CRLF]
    if not has_proto:
        parts.append(b"x-forwarded-proto: http\r\n")
    cluster = stream.cluster
    leaving_mesh = cluster is not None and cluster.external
    for name, value in stream.upstream_extra:
        if leaving_mesh and name in PEER_HEADERS:
            continue  # peer metadata stays inside the mesh (Istio strips it for MESH_EXTERNAL services)
        parts += [name, b": ", value, CRLF]
    parts += [b"x-envoy-attempt-count: ", str(attempt).encode(), CRLF]
    if deadline is not None:
        parts += [b"x-envoy-expected-rq-timeout-ms: ", str(max(0, int((deadline - now) * 1000))).encode(), CRLF]
    if head.chunked:
        parts.append(b"transfer-encoding: chunked\r\n")
    elif head.content_length is not None:
        parts += [b"content-length: ", str(head.content_length).encode(), CRLF]
    parts.append(CRLF)
    return b"".join(parts)


async def exchange(conn: DownstreamProtocol, stream: Stream) -> None:
    """Route, then attempts against the upstream, then finish the stream (never raises)."""
    try:
        await _exchange(conn, stream)
    except asyncio.CancelledError:
        stream.flags.append(DC)  # the client went away
        _drop_upstream(conn, stream)
    except Exception:  # the process must survive anything a peer can make happen
        log.exception("exchange failed for %s %r", stream.head.method, stream.head.target)
        _drop_upstream(conn, stream)
        if not stream.response_started:
            stream.reply(500, b"internal error", "")
        else:
            stream.close_after = True
    finally:
        stream.cancel_timers()
        conn.stream_done(stream)


def _drop_upstream(conn: DownstreamProtocol, stream: Stream) -> None:
    upstream = stream.upstream
    if upstream is not None:
        stream.upstream = None
        conn.pool.discard(upstream)


async def _exchange(conn: DownstreamProtocol, stream: Stream) -> None:
    head = stream.head
    route, port = conn.table.match(head)  # one read of the table: a reload never changes this request
    if route is None:
        stream.reply(*_reply_args(NO_ROUTE))
        return
    stream.route = route
    if route.cors is not None and _cors(stream, route.cors):
        return  # a preflight answered here
    # Fault filter: before routing to the upstream, in the caller's proxy.
    fault = route.fault
    if fault.active:
        delay = decide_delay(fault, conn.randbelow)
        if delay:
            stream.flags.append(DI)
            await asyncio.sleep(delay)
        if decide_abort(fault, conn.randbelow):
            _reply_abort(stream, fault)
            return
    if route.action == ACTION_DIRECT_RESPONSE:
        stream.reply(route.direct_status, route.direct_body, "")
        return
    if route.action == ACTION_REDIRECT:
        redirect = route.redirect
        assert redirect is not None
        stream.reply(redirect.code, b"", "", ((b"location", redirect.location(head.authority, head.path, head.query)),))
        return
    assert route.picker is not None
    dest = route.pick(head, conn.randbelow)
    cluster = dest.cluster_for(port)
    if cluster is None:
        stream.reply(*_reply_args(NO_CLUSTER))
        return
    stream.cluster = cluster
    if not cluster.endpoints:
        stream.reply(*_reply_args(NO_HEALTHY_UPSTREAM))
        return
    if not dest.request_headers.empty:
        stream.request_mutation = dest.request_headers
    if not dest.response_headers.empty:
        stream.response_mutation = dest.response_headers
    if route.mirrors:
        _start_mirrors(conn, stream, route, port)
    state = conn.clusters.state(cluster)
    if state.active_requests >= state.policy.pool.max_requests:  # http2MaxRequests: active requests per cluster
        _reply_overflow(stream)
        return
    if head.expect_continue and not stream.request_complete:
        conn.write(CONTINUE_100)
    state.active_requests += 1
    try:
        await _attempts(conn, stream, route, state)
    finally:
        state.active_requests -= 1


async def _attempts(conn: DownstreamProtocol, stream: Stream, route: Route, state: ClusterState) -> None:
    """Attempts until a response goes downstream, within the route timeout (which starts after any fault delay)."""
    loop = conn.loop
    retry = route.retry
    stream.retries_left = retry.num_retries
    stream.cluster_state = state
    deadline = loop.time() + route.timeout if route.timeout else None
    key = state.hash_key(stream.head, conn.peer_ip)
    avoid_previous = retry.avoid_previous_hosts and key is None  # Istio turns it off with consistent hashing
    tried: list[Endpoint] = []
    reused_reset_retry = True  # one free retry when a kept-alive connection turns out closed by the server
    attempt = 0
    retrying = False
    try:
        while True:
            attempt += 1
            target = state.pick(key, tried if avoid_previous else (), conn.random, loop.time())
            if target is None:  # every endpoint ejected
                stream.reply(*_reply_args(NO_HEALTHY_UPSTREAM))
                return
            endpoint = target.endpoint
            stream.endpoint = endpoint
            tried.append(endpoint)
            remaining = deadline - loop.time() if deadline is not None else None
            try:
                if remaining is not None and remaining <= 0:
                    raise UpstreamTimeoutError()
                upstream = await conn.pool.acquire(state, endpoint, min(remaining, conn.pool.connect_timeout)
                                                   if remaining is not None else None)
            except UpstreamOverflowError:
                _reply_overflow(stream)
                return
            except UpstreamError as error:
                if isinstance(error, UpstreamTimeoutError) or (deadline is not None and loop.time() >= deadline):
                    _finish_timeout(stream, attempt)
                    return
                state.report(target, 0, loop.time())
                if retrying:
                    state.active_retries -= 1
                    retrying = False
                if _should_retry(stream, state, retry, CONNECT_FAILURE, False):
                    retrying = True
                    if not await _back_off(stream, retry, attempt, deadline, conn):
                        return
                    continue
                _give_up(stream, retry, attempt, CONNECT_FAILURE, False, error)
                return

            target.active += 1
            try:
                outcome = await _send(conn, stream, upstream, attempt, deadline, retry.per_try_timeout)
            finally:
                target.active -= 1
            if retrying:
                state.active_retries -= 1
                retrying = False
            if outcome is None:
                state.report(target, stream.status, loop.time())
                conn.pool.release(upstream)
                return
            state.report(target, outcome.status if isinstance(outcome, RetriableResponse) else 0, loop.time())
            conn.pool.discard(upstream)
            if stream.response_started:  # bytes went downstream: never pretend the response was complete
                stream.flags.append(outcome.flag if not isinstance(outcome, RetriableResponse) else UC)
                stream.close_after = True
                conn.reset_after_write()
                return
            if isinstance(outcome, RetriableResponse):
                retrying = True  # the retry slot was taken when the response was judged retriable
                if not await _back_off(stream, retry, attempt, deadline, conn):
                    return
                continue
            if isinstance(outcome, UpstreamTimeoutError) and not outcome.per_try:
                _finish_timeout(stream, attempt)
                return
            kind = PER_TRY_TIMEOUT if isinstance(outcome, UpstreamTimeoutError) else RESET
            if kind == RESET and upstream.reused and upstream.served and reused_reset_retry and stream.replayable \
                    and stream.head.method in IDEMPOTENT:
                reused_reset_retry = False  # the server closed a kept-alive connection as we used it
                tried.pop()
                attempt -= 1
                continue
            if _should_retry(stream, state, retry, kind, True):
                retrying = True
                if not await _back_off(stream, retry, attempt, deadline, conn):
                    return
                continue
            _give_up(stream, retry, attempt, kind, True, outcome)
            return
    finally:
        if retrying:
            state.active_retries -= 1


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
        stream.response_mutation = added if current is None else \
            HeaderMutation(current.remove, current.set + added.set, current.add)
        return False
    if preflight and not cors.forward_unmatched_preflight:
        stream.reply(200, b"", "")
        return True
    return False


MIRROR_TIMEOUT = 30.0  # a shadow request never outlives this, whatever the mirror does


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


class _MirrorSink:
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
                await asyncio.sleep(0.01)
            if not stream.replayable:
                log.debug("mirror of %r skipped: body larger than the retry buffer", head.target)
                return
            body = b"".join(stream.sent) + b"".join(stream.pending)
            state = conn.clusters.state(cluster)
            target = state.pick(None, (), conn.random, conn.loop.time())
            if target is None:
                return
            upstream = await conn.pool.acquire(state, target.endpoint)
            done: asyncio.Future[None] = conn.loop.create_future()
            upstream.attach(_MirrorSink(done), head.method == b"HEAD", head.chunked)  # type: ignore[arg-type]
            upstream.write(request_head_bytes(stream, head, 1, shadow=True))
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


IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})


async def _send(conn: DownstreamProtocol, stream: Stream, upstream: UpstreamConnection, attempt: int,
                deadline: float | None, per_try: float | None) -> UpstreamError | None:
    """One attempt on one connection: write the request, wait for the response to end (or fail)."""
    loop = conn.loop
    head = stream.head
    stream.upstream = upstream
    upstream.attach(stream, stream.head_only, head.chunked)
    waiter: asyncio.Future[UpstreamError | None] = loop.create_future()
    stream.waiter = waiter
    timeout_at = deadline
    if per_try is not None and (deadline is None or loop.time() + per_try < deadline):
        timeout_at = loop.time() + per_try
        stream.timer = loop.call_at(timeout_at, stream.on_timeout, True)
    elif deadline is not None:
        stream.timer = loop.call_at(deadline, stream.on_timeout, False)
    body = stream.sent + stream.pending if stream.sent else stream.pending
    stream.sent = body if stream.replayable else []
    stream.pending = []
    stream.pending_size = 0
    stream.sent_at = loop.time()
    upstream.write(request_head_bytes(stream, head, attempt, deadline, loop.time()))
    for data in body:
        upstream.write_body(data)
    conn.resume_reading(READ_PAUSED_BY_BUFFER)
    if stream.request_complete:
        upstream.end_body()
    outcome = await waiter
    stream.cancel_timers()
    stream.upstream = None
    upstream.sink = None
    return outcome


async def _back_off(stream: Stream, retry: RetryPolicy, attempt: int, deadline: float | None,
                    conn: DownstreamProtocol) -> bool:
    """Spend one retry and wait the jittered back-off; False (after replying 504) if the route timeout ends first."""
    stream.retries_left -= 1
    wait = backoff(retry, attempt, conn.random)
    if deadline is not None and conn.loop.time() + wait >= deadline:
        await asyncio.sleep(max(0.0, deadline - conn.loop.time()))
        _finish_timeout(stream, attempt)
        return False
    await asyncio.sleep(wait)
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
