"""The downstream protocol in one process: limits, timeouts, error answers, forwarding, on an in-memory client.

The upstream is a real loopback server in the same loop (tests/fuzz/inmemory.py); every test
also checks that what reached it re-parses identically with h11.
"""

from __future__ import annotations

import asyncio
import inspect
import sys

from fuzz.inmemory import Pipeline, run

from meshproxy.http1.head import HeadPolicy
from meshproxy.proxy.listener import MAX_PIPELINED
from meshproxy.routing.table import RouteTable

GET = b"GET /x HTTP/1.1\r\nHost: svc\r\n\r\n"


def test_a_request_split_into_single_bytes_is_forwarded_intact() -> None:
    request = (b"POST /up?q=1 HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\nX-A: v \r\n\r\n"
               b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer-X: t\r\n\r\n")

    async def body() -> None:
        async with Pipeline() as p:
            outcome = await p.exchange([request[i:i + 1] for i in range(len(request))])
            assert outcome.statuses() == [200] and not outcome.errors
            [seen] = outcome.seen
            assert (seen.method, seen.target, seen.body) == (b"POST", b"/up?q=1", b"hello world")
            names = [n for n, _ in seen.headers]
            assert names.count(b"transfer-encoding") == 1 and b"content-length" not in names
            assert b"trailer-x" not in names and (b"x-a", b"v") in seen.headers  # trailing OWS gone
            assert p.differential() == []

    run(body)


def test_pipelined_requests_answer_in_order_and_the_queue_is_bounded() -> None:
    async def body() -> None:
        async with Pipeline() as p:
            outcome = await p.exchange([GET * 3])
            assert outcome.statuses() == [200, 200, 200] and not outcome.closed
            outcome = await p.exchange([GET * (MAX_PIPELINED + 50)])
            assert outcome.statuses() == [200] * MAX_PIPELINED + [400]
            assert outcome.closed
            assert p.differential() == []

    run(body)


def test_a_long_pipeline_of_local_replies_behind_a_proxied_request() -> None:
    # The 404s are answered synchronously as each one starts: started one after another by a loop, they must
    # not nest one call deeper each (a recursion of MAX_PIPELINED streams).
    unrouted = b"GET /x HTTP/1.1\r\nHost: nowhere\r\n\r\n"

    async def body() -> None:
        async with Pipeline() as p:
            catch_all = p.ctx.table.catch_all
            only_svc = RouteTable(exact={"svc": catch_all}, wildcards=())  # other hosts: 404 NR, a local reply
            p.ctx.table = only_svc
            limit = sys.getrecursionlimit()
            sys.setrecursionlimit(len(inspect.stack()) + 250)  # room for one request, not for 98 nested ones
            try:
                outcome = await p.exchange([GET + unrouted * (MAX_PIPELINED - 2) + GET])
            finally:
                sys.setrecursionlimit(limit)
            assert outcome.statuses() == [200] + [404] * (MAX_PIPELINED - 2) + [200]
            assert not outcome.closed and len(outcome.seen) == 2

    run(body)


def test_head_size_boundaries_431() -> None:
    # counted as Envoy does: request-target + header names + values; exactly the limit passes.
    def request(extra: int) -> bytes:
        value = b"a" * (60 * 1024 - len(b"/") - len(b"hostsvc") - len(b"x-big") + extra)
        return b"GET / HTTP/1.1\r\nhost: svc\r\nx-big: " + value + b"\r\n\r\n"

    def many(count: int) -> bytes:
        return b"GET / HTTP/1.1\r\nHost: svc\r\n" + b"".join(b"x-h%d: v\r\n" % i for i in range(count - 1)) + b"\r\n"

    async def body() -> None:
        async with Pipeline() as p:
            assert (await p.exchange([request(0)])).statuses() == [200]
            over = await p.exchange([request(1)])
            assert over.statuses() == [431] and over.closed and over.seen == []
            # the same head fed in small pieces: the partial-head guard answers too
            data = request(4096)
            over = await p.exchange([data[i:i + 1000] for i in range(0, len(data), 1000)])
            assert over.statuses() == [431] and over.seen == []
            assert (await p.exchange([many(100)])).statuses() == [200]
            assert (await p.exchange([many(101)])).statuses() == [431]

    run(body)


def test_configured_head_limits() -> None:
    async def body() -> None:
        async with Pipeline(HeadPolicy(max_header_bytes=200, max_header_count=3)) as p:
            assert (await p.exchange([b"GET /" + b"a" * 300 + b" HTTP/1.1\r\nHost: svc\r\n\r\n"])).statuses() == [431]
            assert (await p.exchange([b"GET / HTTP/1.1\r\nHost: svc\r\na: 1\r\nb: 2\r\n\r\n"])).statuses() == [200]
            assert (await p.exchange([b"GET / HTTP/1.1\r\nHost: svc\r\na: 1\r\nb: 2\r\nc: 3\r\n\r\n"])).statuses() == [431]

    run(body)


def test_request_body_limit_413_declared_and_chunked() -> None:
    async def body() -> None:
        async with Pipeline(HeadPolicy(max_body_bytes=1000)) as p:
            ok = await p.exchange([b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 1000\r\n\r\n" + b"x" * 1000])
            assert ok.statuses() == [200]
            declared = await p.exchange([b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 1001\r\n\r\n" + b"x" * 1001])
            assert declared.statuses() == [413] and declared.closed and declared.seen == []
            chunks = [b"POST / HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"]
            chunks += [b"190\r\n" + b"y" * 400 + b"\r\n"] * 5 + [b"0\r\n\r\n"]
            streamed = await p.exchange(chunks)
            assert streamed.statuses() == [413] and streamed.closed
            assert streamed.seen == []  # the upstream never got a complete request
            assert b"connection: close" in streamed.out.lower()

    run(body)


def test_header_timeout_408_and_silent_close_of_a_connection_that_sent_nothing() -> None:
    async def body() -> None:
        async with Pipeline(request_headers_timeout=0.1) as p:
            loop = asyncio.get_running_loop()
            started = loop.time()
            slow = await p.exchange([b"GET / HTTP/1.1\r\nHo"], settle=3, until_closed=True)
            assert slow.statuses() == [408] and slow.closed
            assert 0.05 < loop.time() - started < 2.5
            silent = await p.exchange([], settle=3, until_closed=True)
            assert silent.out == b"" and silent.closed
            # a head completed in time is served; the timer does not leak into the response time
            assert (await p.exchange([b"GET / HTTP/1.1\r\n", b"Host: svc\r\n\r\n"])).statuses() == [200]

    run(body)


def test_idle_keep_alive_connection_is_closed_without_a_reply() -> None:
    async def body() -> None:
        async with Pipeline(idle_timeout=0.1, request_headers_timeout=0) as p:
            async def pause() -> None:
                await asyncio.sleep(0.4)

            outcome = await p.exchange([GET, GET], between=pause, until_closed=True)
            assert outcome.statuses() == [200] and outcome.closed  # the second came after the idle close

    run(body)


def test_stream_idle_while_the_body_stalls_is_408_SI() -> None:
    async def body() -> None:
        async with Pipeline(stream_idle_timeout=0.1) as p:
            async def stall() -> None:
                await asyncio.sleep(0.5)

            outcome = await p.exchange([b"POST / HTTP/1.1\r\nHost: svc\r\nContent-Length: 10\r\n\r\nabc",
                                        b"defghij"], between=stall, settle=3)
            assert outcome.statuses() == [408] and outcome.closed and b"stream timeout" in outcome.out
            assert outcome.seen == []

    run(body)


def test_underscore_actions_end_to_end() -> None:
    line = b"GET / HTTP/1.1\r\nHost: svc\r\nX_User: admin\r\nX-Ok: 1\r\n\r\n"

    async def body() -> None:
        async with Pipeline() as p:
            rejected = await p.exchange([line])
            assert rejected.statuses() == [400] and rejected.seen == []
        async with Pipeline(HeadPolicy(underscores="drop")) as p:
            [seen] = (await p.exchange([line])).seen
            assert b"x_user" not in [n for n, _ in seen.headers] and (b"x-ok", b"1") in seen.headers
        async with Pipeline(HeadPolicy(underscores="allow")) as p:
            [seen] = (await p.exchange([line])).seen
            assert (b"x_user", b"admin") in seen.headers
            assert p.differential() == []

    run(body)


def test_codec_error_after_a_good_request_answers_both_then_closes() -> None:
    async def body() -> None:
        async with Pipeline() as p:
            outcome = await p.exchange([GET + b"GET / HTTP/1.1\r\nBad Header\r\n\r\n"])
            assert outcome.statuses() == [200, 400] and outcome.closed and len(outcome.seen) == 1
            closing = await p.exchange([b"GET / HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n" + GET])
            assert closing.statuses() == [200] and closing.closed and len(closing.seen) == 1

    run(body)
