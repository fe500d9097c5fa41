"""Certificates and TLS peers for the security tests: a mesh CA made with meshproxy's own `ca` (cryptography),
and an aiohttp server on loopback that terminates TLS with a given context, recording what each connection
showed (SNI, ALPN, the client's certificate)."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from harness import Upstream
from meshproxy.security.ca import MeshCA, init_ca, issue


@dataclass
class Mesh:
    root: Path  # CA folder
    ca: MeshCA

    def workload(self, folder: Path, namespace: str, service_account: str, **kwargs: Any) -> Path:
        issue(self.ca, namespace, service_account, folder, **kwargs)
        return folder

    @property
    def roots(self) -> Path:
        return self.root / "root-cert.pem"


def make_mesh(tmp: Path, key_type: str = "ec") -> Mesh:
    return Mesh(tmp / "ca", init_ca(tmp / "ca", key_type=key_type))


def server_context(cert_dir: Path, client_roots: Path | None = None,
                   alpn: tuple[str, ...] = ("http/1.1",)) -> ssl.SSLContext:
    """A TLS server with a workload certificate; with `client_roots`, it requires a client certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_dir / "cert-chain.pem", cert_dir / "key.pem")
    if client_roots is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=str(client_roots))
    context.set_alpn_protocols(list(alpn))
    return context


class TLSUpstream(Upstream):
    """harness.Upstream over TLS. `seen` has one entry per request: the connection's SNI, ALPN and client URI SANs."""

    def __init__(self, name: str, context: ssl.SSLContext) -> None:
        self.context = context
        self.sni: list[str | None] = []
        self.seen: list[dict[str, Any]] = []
        context.sni_callback = self._on_sni
        super().__init__(name)

    def _on_sni(self, ssl_object: ssl.SSLObject, name: str | None, context: ssl.SSLContext) -> None:
        self.sni.append(name)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._tls_dispatch)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=self.context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _tls_dispatch(self, request: web.Request) -> web.StreamResponse:
        transport = request.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        cert = ssl_object.getpeercert() if ssl_object is not None else None
        self.seen.append({
            "sni": ssl_object.server_hostname if ssl_object is not None else None,
            "alpn": ssl_object.selected_alpn_protocol() if ssl_object is not None else None,
            "client_uris": [v for k, v in (cert or {}).get("subjectAltName", ()) if k == "URI"],
        })
        return await self._dispatch(request)


def memory_bio_handshake(sock: socket.socket, tls: ssl.SSLObject, incoming: ssl.MemoryBIO,
                         outgoing: ssl.MemoryBIO) -> Callable[[], bool]:
    """A blocking peer's TLS on memory BIOs (it can half-close, which ssl.SSLSocket cannot): run the handshake over
    `sock`, and return `pump`, one recv into `incoming` (its EOF at the socket's end), True while bytes came.
    What the handshake leaves in `outgoing` is the caller's to send."""
    def pump() -> bool:
        piece = sock.recv(65536)
        incoming.write(piece) if piece else incoming.write_eof()
        return bool(piece)

    while True:
        try:
            tls.do_handshake()
            return pump
        except ssl.SSLWantReadError:
            sock.sendall(outgoing.read())
            pump()
