"""A finished HTTP/2 stream leaves no reference cycle behind: its objects go as their last reference does, not at
the cyclic collector's next run (which, before, was 6 % of the HTTP/2 path's instructions: benchmarks/README.md,
"The rest of the HTTP/2 path"). Checked with the collector off: whatever a cycle holds then stays."""

from __future__ import annotations

import asyncio
import gc
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest

from harness import Upstream

REQUESTS = 20
APP = """apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: app}
spec:
  hosts: [app]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1, ports: {http: %d}}]
"""


@pytest.fixture
def app() -> Iterator[Upstream]:
    server = Upstream("app")
    yield server
    server.close()


def test_finished_http2_streams_need_no_cyclic_collection(app: Upstream, tmp_path: Path) -> None:
    """h2c with prior knowledge to the outbound listener, HTTP/1.1 to the app."""
    from meshproxy.app import ProxyApp
    from meshproxy.proxy.exchange import Stream
    from meshproxy.proxy.h2_listener import H2DownstreamStream
    from meshproxy.settings import Settings

    config = tmp_path / "app.yaml"
    config.write_text(APP % app.port)

    def live() -> int:
        return sum(1 for o in gc.get_objects() if type(o) in (H2DownstreamStream, Stream))

    async def scenario() -> None:
        proxy = ProxyApp(Settings(config=(str(config),), listen=("127.0.0.1", 0), admin=None, metrics=False,
                                  tracing=False, watch_interval=0))
        await proxy.start()
        writer: asyncio.StreamWriter | None = None
        gc.collect()
        gc.disable()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.addresses["outbound"][1])
            client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
            client.initiate_connection()
            for stream_id in range(1, 2 * REQUESTS, 2):
                client.send_headers(stream_id, [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"app"),
                                                (b":path", b"/echo")], end_stream=True)
            writer.write(client.data_to_send())
            answered = 0
            while answered < REQUESTS:
                data = await asyncio.wait_for(reader.read(65536), 10)
                assert data, "the proxy closed the connection"
                for event in client.receive_data(data):
                    if isinstance(event, h2.events.ResponseReceived):
                        assert dict(event.headers)[b":status"] == b"200"
                    elif isinstance(event, h2.events.StreamEnded):
                        answered += 1
                writer.write(client.data_to_send())
            deadline = time.monotonic() + 10  # the last streams finish just after their END_STREAM went out
            while live():
                assert time.monotonic() < deadline, f"{live()} stream objects kept alive by a reference cycle"
                await asyncio.sleep(0.01)
        finally:
            gc.enable()
            if writer is not None:
                writer.close()
            await proxy.drain()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    asyncio.run(scenario())
