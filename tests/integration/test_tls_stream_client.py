"""proxy/tls_stream.py's client side over a real loopback connection, against a TLS server (OpenSSL through
ssl.MemoryBIO on a blocking socket, in a thread) that ends its direction with a close_notify: the app protocol hears
the end at the close_notify itself, not only at a FIN, and its own direction still flows; what arrives between the
handshake and the hand-over (bytes, the close_notify) is delivered at the hand-over, in order."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

import uvloop

from meshproxy.proxy.tls_stream import TLSStream
from tls_peers import memory_bio_handshake, make_mesh

GREETING = b"server first"
REPLY = b"the client's answer after the server's close_notify"


class Recorder(asyncio.Protocol):
    """Records what it hears; at the end of the server's direction it answers (or not), then closes."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.transport: asyncio.Transport | None = None
        self.events: list[str] = []
        self.received = b""
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.events.append("data")
        self.received += data

    def eof_received(self) -> bool:
        self.events.append("eof")
        assert self.transport is not None
        if not self.answer:
            return False  # the stream closes
        self.transport.write(self.answer)
        self.transport.write_eof()  # our close_notify, then a FIN
        self.transport.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        if not self.lost.done():
            self.lost.set_result(exc)


def close_notifying_server(listener: socket.socket, context: ssl.SSLContext, hang_up: bool) -> tuple[bytes, bool]:
    """Handshake, GREETING, our close_notify; then (`hang_up`) a FIN at once, or reading on until the client's end.
    (what the client sent, whether its end was a close_notify)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_side=True)
    sock, _ = listener.accept()
    with sock:
        sock.settimeout(15)  # a client that never answers fails the test rather than hanging it

        pump = memory_bio_handshake(sock, tls, incoming, outgoing)
        tls.write(GREETING)
        try:
            tls.unwrap()  # our close_notify; the TCP connection stays open both ways
        except ssl.SSLWantReadError:
            pass
        sock.sendall(outgoing.read())
        if hang_up:
            sock.shutdown(socket.SHUT_WR)
            return b"", False
        got: list[bytes] = []
        while True:
            try:
                piece = tls.read(65536)
                if not piece:
                    return b"".join(got), True
                got.append(piece)
            except ssl.SSLWantReadError:
                if not pump():
                    return b"".join(got), False
            except ssl.SSLZeroReturnError:  # the client's close_notify, after ours
                return b"".join(got), True


def contexts(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    mesh = make_mesh(tmp_path)
    server_dir = mesh.workload(tmp_path / "server", "default", "server")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(server_dir / "cert-chain.pem", server_dir / "key.pem")
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.load_verify_locations(cafile=str(mesh.roots))
    return server, client


async def handshaken(server: ssl.SSLContext, client: ssl.SSLContext, hang_up: bool
                     ) -> tuple[TLSStream, asyncio.Future[tuple[bytes, bool]], socket.socket]:
    """A client TLSStream whose handshake with `close_notifying_server` is done (no protocol yet), the server's
    outcome to come, and the listener (to close)."""
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", 0))
    served = loop.run_in_executor(None, close_notifying_server, listener, server, hang_up)
    stream = TLSStream.client(client, "")
    await loop.create_connection(lambda: stream, *listener.getsockname())
    await asyncio.wait_for(stream.handshake, 15)
    return stream, served, listener


def test_the_servers_close_notify_ends_its_direction_and_ours_still_flows(tmp_path: Path) -> None:
    server, client = contexts(tmp_path)

    async def main() -> tuple[tuple[bytes, bool], Recorder, Exception | None]:
        stream, served, listener = await handshaken(server, client, hang_up=False)
        with listener:
            app = Recorder(REPLY)
            stream.hand_over(app)
            got = await asyncio.wait_for(served, 20)
            lost = await asyncio.wait_for(app.lost, 15)
        return got, app, lost

    (got, ended_by_close_notify), app, lost = uvloop.run(main())
    assert app.received == GREETING
    assert app.events[-2:] == ["eof", "lost"] and app.events.count("eof") == 1
    assert got == REPLY and ended_by_close_notify
    assert lost is None


def test_what_arrives_before_the_hand_over_is_delivered_at_it_in_order(tmp_path: Path) -> None:
    server, client = contexts(tmp_path)

    async def main() -> tuple[Recorder, Exception | None]:
        stream, served, listener = await handshaken(server, client, hang_up=True)
        with listener:
            await asyncio.wait_for(served, 15)
            async with asyncio.timeout(15):  # the server's end reaches the stream, held (no protocol yet)
                while not stream.peer_ended:
                    await asyncio.sleep(0.01)
            app = Recorder(b"")  # at the end: no answer, the stream closes
            stream.hand_over(app)
            lost = await asyncio.wait_for(app.lost, 15)
        return app, lost

    app, lost = uvloop.run(main())
    assert app.events == ["data", "eof", "lost"]
    assert app.received == GREETING
    assert lost is None
