"""One request, top to bottom, as in DESIGN.md's diagram: one linear coroutine.

`Stream` is the per-request state both protocols talk to: the downstream side
feeds it request body bytes, the upstream side feeds it the response, and it
writes the response downstream as it arrives (backpressure both ways). The
coroutine `exchange()` makes the decisions: route, local replies, attempts.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import TYPE_CHECKING

from ..http1.head import RequestHead
from ..http1.wire import CONTINUE_100, CRLF, DATE, HOP_BY_HOP, LAST_CHUNK, chunk, local_reply, status_line
from ..routing.cluster import Cluster, Endpoint
from ..routing.policy import ACTION_DIRECT_RESPONSE, ACTION_REDIRECT, RETRY_ON_CONNECT_FAILURE, HeaderMutation, Route
from .local_reply import (
    DC,
    NO_CLUSTER,
    NO_HEALTHY_UPSTREAM,
    NO_ROUTE,
    URX,
    ResponseResetError,
    UpstreamError,
)
from .upstream import FRAMING_CHUNKED, FRAMING_EOF, FRAMING_LENGTH, UpstreamConnection

if TYPE_CHECKING:
    from .listener import DownstreamProtocol

log = logging.getLogger("meshproxy.exchange")

READ_PAUSED_BY_UPSTREAM = 1
READ_PAUSED_BY_BUFFER = 2
PENDING_BODY_LIMIT = 1 << 20  # request body held while connecting; above it, stop reading the client
RESPONSE_HOP_BY_HOP = HOP_BY_HOP


class Stream:
    """Per-request state shared by the downstream and upstream protocols."""

    __slots__ = (
        "conn", "head", "pending", "pending_size", "request_complete", "upstream", "waiter", "response_started",
        "response_chunked", "response_complete", "status", "flags", "start", "response_bytes", "close_after",
        "request_mutation", "response_mutation", "route", "cluster", "endpoint", "head_only",
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

    # ---- request body, from the downstream protocol

    def on_request_body(self, data: bytes) -> None:
        upstream = self.upstream
        if upstream is not None:
            upstream.write_body(data)
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
        self.status = status
        self.response_started = True
        conn = self.conn
        parts = [status_line(status)]
        mutation = self.response_mutation
        if mutation is not None:
            headers = apply_mutation(headers, mutation)
        for name, value in headers:
            if name not in RESPONSE_HOP_BY_HOP:
                parts += [name, b": ", value, CRLF]
        if framing == FRAMING_LENGTH:
            parts += [b"content-length: ", str(content_length).encode(), CRLF]
        elif framing == FRAMING_CHUNKED or framing == FRAMING_EOF:
            if self.head.version == b"1.1":
                parts.append(b"transfer-encoding: chunked\r\n")
                self.response_chunked = True
            else:
                self.close_after = True  # HTTP/1.0 client: the body ends when we close
        if conn.draining:
            self.close_after = True
        if self.close_after:
            parts.append(b"connection: close\r\n")
        parts.append(CRLF)
        conn.write(b"".join(parts))

    def on_response_body(self, data: bytes) -> None:
        self.response_bytes += len(data)
        if self.head_only:
            return
        self.conn.write(chunk(data) if self.response_chunked else data)

    def on_response_end(self) -> None:
        if self.response_chunked and not self.head_only:
            self.conn.write(LAST_CHUNK)
        self.response_complete = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_upstream_error(self, error: UpstreamError) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(error)

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
        self.conn.write(local_reply(status, body, close=close, server=self.conn.server_name, extra=extra,
                                    head_only=self.head_only))


def apply_mutation(headers: list[tuple[bytes, bytes]], mutation: HeaderMutation) -> list[tuple[bytes, bytes]]:
    """Envoy's order: remove, then set (replace all values), then add (append)."""
    drop = mutation.remove | {name for name, _ in mutation.set}
    out = [(n, v) for n, v in headers if n not in drop] if drop else list(headers)
    out += mutation.set
    out += mutation.add
    return out


def request_head_bytes(stream: Stream, head: RequestHead, attempt: int) -> bytes:
    """The upstream request head: origin-form, hop-by-hop removed, framing regenerated."""
    conn = stream.conn
    drop = HOP_BY_HOP | head.connection_tokens if head.connection_tokens else HOP_BY_HOP
    headers = head.headers
    if stream.request_mutation is not None:
        headers = apply_mutation(headers, stream.request_mutation)
    parts = [head.method, b" ", head.path_and_query, b" HTTP/1.1\r\n"]
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
        if name == b"host":
            value = head.authority
        elif name.startswith(b"x-envoy-attempt-count"):
            continue
        parts += [name, b": ", value, CRLF]
    if head.header(b"host") is None:
        parts += [b"host: ", head.authority, CRLF]
    peer = conn.peer_ip
    parts += [b"x-forwarded-for: ", (xff + b", " + peer) if xff else peer, CRLF]
    if not has_proto:
        parts.append(b"x-forwarded-proto: http\r\n")
    parts += [b"x-envoy-attempt-count: ", str(attempt).encode(), CRLF]
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
    if route.action == ACTION_DIRECT_RESPONSE:
        stream.reply(route.direct_status, route.direct_body, "")
        return
    if route.action == ACTION_REDIRECT:
        stream.reply(route.redirect_code, b"", "", ((b"location", _redirect_location(route, head)),))
        return
    assert route.picker is not None
    dest = route.picker.pick(conn.randbelow)
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
    if head.expect_continue and not stream.request_complete:
        conn.write(CONTINUE_100)

    retry = route.retry
    retries_left = retry.num_retries if retry.retry_on & RETRY_ON_CONNECT_FAILURE else 0
    attempt = 0
    tried: list[Endpoint] = []
    loop = asyncio.get_running_loop()
    while True:
        attempt += 1
        endpoint = _pick_endpoint(conn, cluster, tried if retry.avoid_previous_hosts else ())
        stream.endpoint = endpoint
        tried.append(endpoint)
        try:
            upstream = await conn.pool.acquire(endpoint.key)
        except UpstreamError as error:
            if retries_left > 0 and error.retriable_as_connect_failure:
                retries_left -= 1
                await asyncio.sleep(_backoff(retry.backoff_base, retry.backoff_max, attempt, conn.random))
                continue
            if attempt > 1:
                stream.flags.append(URX)
            stream.reply(error.status, error.body(attempt > 1), error.flag)
            return
        break

    stream.upstream = upstream
    upstream.attach(stream, stream.head_only, head.chunked)
    waiter: asyncio.Future[UpstreamError | None] = loop.create_future()
    stream.waiter = waiter
    body = b"".join(stream.pending)
    stream.pending.clear()
    stream.pending_size = 0
    head_bytes = request_head_bytes(stream, head, attempt)
    upstream.write(head_bytes)
    if body:
        upstream.write_body(body)
    conn.resume_reading(READ_PAUSED_BY_BUFFER)
    if stream.request_complete:
        upstream.end_body()
    error = await waiter
    stream.upstream = None
    if error is None:
        conn.pool.release(upstream)
        return
    conn.pool.discard(upstream)
    if isinstance(error, ResponseResetError) or stream.response_started:
        stream.flags.append(error.flag)
        stream.close_after = True
        conn.reset_after_write()  # never let a cut response look complete
        return
    stream.reply(error.status, error.body(attempt > 1), error.flag)


def _reply_args(reply: object) -> tuple[int, bytes, str]:
    return reply.status, reply.body, reply.flag  # type: ignore[attr-defined]


def _pick_endpoint(conn: DownstreamProtocol, cluster: Cluster, avoid: object) -> Endpoint:
    """Round robin over the cluster's endpoints, skipping ones already tried when others exist."""
    endpoints = cluster.endpoints
    if len(endpoints) == 1:
        return endpoints[0]
    counters = conn.rr_counters
    start = counters.get(cluster.name, 0)
    for i in range(len(endpoints)):
        endpoint = endpoints[(start + i) % len(endpoints)]
        if endpoint not in avoid:  # type: ignore[operator]
            counters[cluster.name] = start + i + 1
            return endpoint
    counters[cluster.name] = start + 1
    return endpoints[start % len(endpoints)]


def _backoff(base: float, cap: float, attempt: int, rng: random.Random) -> float:
    """Envoy's fully jittered exponential back-off: uniform in [0, (2^n - 1) * base), capped."""
    return rng.random() * min((2 ** (attempt) - 1) * base, cap)


def _redirect_location(route: Route, head: RequestHead) -> bytes:
    scheme, authority, uri, prefix = route.redirect_location or ("", "", "", "")
    path = head.path_and_query.decode("latin-1")
    if uri:
        path = uri
    elif prefix and route.match.path is not None and route.match.path.kind == "prefix":
        path = prefix + path[len(route.match.path.value):]
    host = authority or head.authority.decode("latin-1")
    return f"{scheme or 'http'}://{host}{path}".encode()
