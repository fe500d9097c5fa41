"""The upstream pool's idle connections, over real loopback sockets: reuse, and closing at the idle timeout."""

from __future__ import annotations

import asyncio

from meshproxy.proxy.balancer import Clusters
from meshproxy.proxy.upstream import UpstreamPool
from meshproxy.routing.cluster import Cluster, Endpoint
from meshproxy.routing.traffic import ClusterPolicy, ConnectionPool


class Accepting(asyncio.Protocol):
    """A server that only accepts connections and records each one closed."""

    def __init__(self, closed: list[asyncio.Protocol]) -> None:
        self.closed = closed

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.append(self)


def test_idle_connections_are_reused_then_closed_at_their_timeout() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        closed: list[asyncio.Protocol] = []
        server = await loop.create_server(lambda: Accepting(closed), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        fast = Clusters().state(Cluster("outbound|80||fast", "fast", 80, "", (Endpoint("127.0.0.1", port),),
                                        ClusterPolicy(pool=ConnectionPool(idle_timeout=0.3))))
        slow = Clusters().state(Cluster("outbound|80||slow", "slow", 80, "", (Endpoint("127.0.0.1", port),)))
        pool = UpstreamPool(idle_timeout=6.0, connect_timeout=2.0)
        try:
            first = await pool.acquire(fast, fast.endpoints[0])
            pool.release(first)
            assert pool.reuse(fast.endpoints[0].pool_key) is first  # back to the pool, and out again
            pool.release(first)
            other = await pool.acquire(slow, slow.endpoints[0])
            pool.release(other)
            assert pool.idle_count == 2
            started = loop.time()
            while not first.closed and loop.time() - started < 5.0:  # the cluster's 0.3 s, on a loaded machine
                await asyncio.sleep(0.05)
            assert first.closed and loop.time() - started >= 0.25
            if loop.time() - started < 5.0:  # the pool's default 6 s has not run out yet
                assert not other.closed and pool.idle_count == 1
            assert pool.reuse(fast.endpoints[0].pool_key) is None
            while not other.closed and loop.time() - started < 20.0:
                await asyncio.sleep(0.05)
            assert other.closed and loop.time() - started >= 5.5 and pool.idle_count == 0 and pool.sweep is None
            for _ in range(50):  # the server sees both closed
                if len(closed) == 2:
                    break
                await asyncio.sleep(0.02)
            assert len(closed) == 2
        finally:
            pool.close_idle()
            server.close()
            await server.wait_closed()

    asyncio.run(body())
