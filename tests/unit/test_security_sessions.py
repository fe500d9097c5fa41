"""Upstream TLS session resumption (security/sessions.py) over real loopback connections on uvloop: the workload
contexts of `meshproxy ca` certificates, a server that requires a client certificate, as between two sidecars."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest
import uvloop

from meshproxy.security.ca import init_ca, issue
from meshproxy.security.certs import client_context, read_cert_dir, server_context
from meshproxy.security.sessions import RECENT_CONNECTIONS, ResumingClientContext

SERVER_ID = "spiffe://cluster.local/ns/default/sa/server"
SNI = "outbound_.9080_.v1_.server.default.svc.cluster.local"


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


class Answer(asyncio.Protocol):
    def __init__(self, done: asyncio.Future[bytes]) -> None:
        self.done = done

    def data_received(self, data: bytes) -> None:
        if not self.done.done():
            self.done.set_result(data)


class Plaintext(asyncio.Protocol):
    """Not TLS: answers the ClientHello with an HTTP error, as a mislabelled plaintext pod would."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("mesh")
    ca = init_ca(tmp / "ca", key_type="ec")
    issue(ca, "default", "client", tmp / "client")
    issue(ca, "default", "server", tmp / "server")
    return tmp / "client", tmp / "server"


async def exchange(port: int, context: ssl.SSLContext, sni: str = SNI) -> tuple[bool, list[str]]:
    """One connection: handshake, one round trip (the server's tickets arrive with it), close. -> (resumed, the
    server's URI SANs as the client sees them)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bytes] = loop.create_future()
    transport, _ = await loop.create_connection(lambda: Answer(done), "127.0.0.1", port, ssl=context,
                                                server_hostname=sni)
    try:
        transport.write(b"ping")  # type: ignore[attr-defined]
        assert await asyncio.wait_for(done, 10) == b"ping"
        ssl_object = transport.get_extra_info("ssl_object")
        cert = ssl_object.getpeercert()
        return ssl_object.session_reused, [value for kind, value in cert["subjectAltName"] if kind == "URI"]
    finally:
        transport.close()


async def serve(context: ssl.SSLContext | None, protocol: type[asyncio.Protocol] = Echo) -> asyncio.AbstractServer:
    return await asyncio.get_running_loop().create_server(protocol, "127.0.0.1", 0, ssl=context)


def port_of(server: asyncio.AbstractServer) -> int:
    return int(server.sockets[0].getsockname()[1])


def test_the_workload_client_context_resumes_sessions_and_still_sees_the_server_identity(
        certs: tuple[Path, Path]) -> None:
    client, server = read_cert_dir(certs[0]), read_cert_dir(certs[1])
    context = client_context(client)
    assert isinstance(context, ResumingClientContext)

    async def main() -> list[tuple[bool, list[str]]]:
        listener = await serve(server_context(server))
        try:
            return [await exchange(port_of(listener), context) for _ in range(5)]
        finally:
            listener.close()

    results = uvloop.run(main())
    assert results[0] == (False, [SERVER_ID])  # nothing to resume yet: a full handshake
    assert results[1:] == [(True, [SERVER_ID])] * 4  # the peer certificate comes with the resumed session


def test_sessions_are_per_server_name_and_a_server_that_did_not_issue_one_gets_a_full_handshake(
        certs: tuple[Path, Path]) -> None:
    client, server = read_cert_dir(certs[0]), read_cert_dir(certs[1])
    context = client_context(client)

    async def main() -> list[bool]:
        first, second = await serve(server_context(server)), await serve(server_context(server))
        try:
            return [
                (await exchange(port_of(first), context))[0],
                (await exchange(port_of(first), context))[0],
                (await exchange(port_of(first), context, sni="outbound_.9080_.v2_.server"))[0],  # another SNI
                (await exchange(port_of(second), context))[0],  # its own ticket keys: the ticket is refused
                (await exchange(port_of(second), context))[0],  # ... and its new ticket is used next
            ]
        finally:
            first.close()
            second.close()

    assert uvloop.run(main()) == [False, True, False, False, True]


def test_a_failed_handshake_does_not_break_the_next_connections(certs: tuple[Path, Path]) -> None:
    client, server = read_cert_dir(certs[0]), read_cert_dir(certs[1])
    context = client_context(client)

    async def main() -> list[bool]:
        plain, tls = await serve(None, Plaintext), await serve(server_context(server))
        loop = asyncio.get_running_loop()
        try:
            for _ in range(RECENT_CONNECTIONS + 2):  # more failures than the connections it remembers
                with pytest.raises(ssl.SSLError, match="WRONG_VERSION_NUMBER"):
                    await loop.create_connection(asyncio.Protocol, "127.0.0.1", port_of(plain), ssl=context,
                                                 server_hostname=SNI)
            return [(await exchange(port_of(tls), context))[0] for _ in range(3)]
        finally:
            plain.close()
            tls.close()

    assert uvloop.run(main()) == [False, True, True]


def test_many_connections_at_once_still_resume(certs: tuple[Path, Path]) -> None:
    """Sessions are taken from the oldest of the last connections, so connections opened in bursts (a pool
    filling up, one request per connection under load) resume too once a first round trip is done."""
    client, server = read_cert_dir(certs[0]), read_cert_dir(certs[1])
    context = client_context(client)

    async def main() -> list[bool]:
        listener = await serve(server_context(server))
        try:
            await exchange(port_of(listener), context)
            results = []
            for _ in range(3):  # bursts of 3 x RECENT_CONNECTIONS concurrent connections
                batch = await asyncio.gather(*(exchange(port_of(listener), context)
                                               for _ in range(3 * RECENT_CONNECTIONS)))
                results += [resumed for resumed, _ in batch]
            return results
        finally:
            listener.close()

    results = uvloop.run(main())
    assert all(results), f"{results.count(False)} of {len(results)} connections were full handshakes"
