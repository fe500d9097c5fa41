"""proxy/tls_stream.py's server side over a real loopback connection: a TLS client (OpenSSL through ssl.MemoryBIO
on a blocking socket, in a thread) sends data, then its close_notify and a FIN, and keeps reading; the server's app
protocol answers after the EOF and then half-closes in turn. With the event loop's own TLS the answer would be
lost (it closes the whole connection at the close_notify)."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

import pytest
import uvloop

from meshproxy.proxy.tls_stream import TLSStream
from meshproxy.security.certs import CertStore
from tls_peers import memory_bio_handshake, make_mesh

ANSWER_AFTER_EOF = b"answered after your close_notify"


class EchoThenAnswer(asyncio.Protocol):
    """Echoes; at the client's EOF it answers once more, then half-closes itself and closes."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.principal = ""
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        cert = transport.get_extra_info("ssl_object").getpeercert()
        self.principal = next(v for k, v in cert["subjectAltName"] if k == "URI")

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def eof_received(self) -> bool:
        asyncio.get_running_loop().call_soon(self._answer)  # later, as an upstream's answer comes
        return True  # keep the connection open for it

    def _answer(self) -> None:
        assert self.transport is not None
        self.transport.write(ANSWER_AFTER_EOF)
        self.transport.write_eof()  # our close_notify, then a FIN
        self.transport.close()  # both ways done (TcpProxy closes the same way)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


def half_closing_client(port: int, context: ssl.SSLContext, data: bytes) -> bytes:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing)
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        pump = memory_bio_handshake(sock, tls, incoming, outgoing)
        sock.sendall(outgoing.read())
        tls.write(data)
        try:
            tls.unwrap()  # our close_notify; the server's comes later
        except ssl.SSLWantReadError:
            pass
        sock.sendall(outgoing.read())
        sock.shutdown(socket.SHUT_WR)
        got = []
        while True:
            try:
                piece = tls.read(65536)
                if not piece:
                    break
                got.append(piece)
            except ssl.SSLWantReadError:
                if not pump():
                    break
            except ssl.SSLZeroReturnError:  # the server's close_notify: its half-close
                break
        return b"".join(got)


def test_a_half_close_over_tls_keeps_the_other_direction(tmp_path: Path) -> None:
    mesh = make_mesh(tmp_path)
    server_dir = mesh.workload(tmp_path / "server", "default", "server")
    client_dir = mesh.workload(tmp_path / "client", "default", "client")
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.load_verify_locations(cafile=str(mesh.roots))
    client.load_cert_chain(client_dir / "cert-chain.pem", client_dir / "key.pem")
    client.set_alpn_protocols(["istio-peer-exchange", "istio"])
    payload = bytes(range(256)) * 4096  # 1 MiB: many records each way

    async def main() -> tuple[bytes, str, Exception | None]:
        loop = asyncio.get_running_loop()
        store = CertStore(str(server_dir))
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        port = listener.getsockname()[1]
        answer = loop.run_in_executor(None, half_closing_client, port, client, payload)
        conn, _ = await loop.sock_accept(listener)
        done = loop.create_future()
        apps: list[EchoThenAnswer] = []

        def app() -> asyncio.Protocol:
            apps.append(EchoThenAnswer())
            return apps[-1]

        await loop.connect_accepted_socket(
            lambda: TLSStream.server(store.server_context(alpn=("h2", "http/1.1")), app, 10.0, done), conn)
        await done
        got = await asyncio.wait_for(answer, 15)
        lost = await asyncio.wait_for(apps[0].lost, 15)
        listener.close()
        return got, apps[0].principal, lost

    got, principal, lost = uvloop.run(main())
    assert got == payload + ANSWER_AFTER_EOF
    assert principal == "spiffe://cluster.local/ns/default/sa/client"
    assert lost is None


def test_a_client_without_a_certificate_fails_the_handshake(tmp_path: Path) -> None:
    mesh = make_mesh(tmp_path)
    server_dir = mesh.workload(tmp_path / "server", "default", "server")
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.check_hostname = False
    anonymous.load_verify_locations(cafile=str(mesh.roots))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        store = CertStore(str(server_dir))
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        attempt = loop.run_in_executor(None, half_closing_client, listener.getsockname()[1], anonymous, b"x")
        conn, _ = await loop.sock_accept(listener)
        done = loop.create_future()
        await loop.connect_accepted_socket(
            lambda: TLSStream.server(store.server_context(), EchoThenAnswer, 10.0, done), conn)
        with pytest.raises(ssl.SSLError):
            await done
        with pytest.raises((ssl.SSLError, OSError)):
            await asyncio.wait_for(attempt, 15)
        listener.close()

    uvloop.run(main())
