"""Plain TCP peers for the TCP proxy's tests: threaded socket servers on free loopback (or given) addresses.

Each server records what it received per connection and who connected (the peer address), and does one thing:
- `echo`: sends back what it reads; on EOF it half-closes too.
- `digest_after_eof`: reads to EOF, then answers the SHA-256 of what it read (a response after the client's
  half-close), then closes.
- `greet_then_half_close`: sends a greeting and half-closes at once, then keeps reading until the client's EOF
  (a half-close from the server side while the other direction still flows).
- `server_first`: sends a banner before reading anything (as MySQL, SMTP), then echoes.
- `named(name)`: sends its name, then echoes (tells which backend a connection reached).
- `tls(name, cert, key)`: a TLS server whose certificate is for `name`; after the handshake it sends its name.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


class TcpServer:
    def __init__(self, handler: Callable[[socket.socket, TcpServer], None], host: str = "127.0.0.1",
                 port: int = 0) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(128)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.handler = handler
        self.peers: list[tuple[str, int]] = []
        self.received: list[bytes] = []
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.peers.append(peer)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self.handler(conn, self)
        except OSError:
            pass
        finally:
            conn.close()

    def keep(self, data: bytes) -> None:
        with self.lock:
            self.received.append(data)

    def close(self) -> None:
        self.closed = True
        self.sock.close()


def read_all(conn: socket.socket) -> bytes:
    chunks = []
    while True:
        piece = conn.recv(1 << 16)
        if not piece:
            return b"".join(chunks)
        chunks.append(piece)


def echo(conn: socket.socket, server: TcpServer) -> None:
    got = []
    while True:
        piece = conn.recv(1 << 16)
        if not piece:
            break
        got.append(piece)
        conn.sendall(piece)
    server.keep(b"".join(got))
    conn.shutdown(socket.SHUT_WR)


def digest_after_eof(conn: socket.socket, server: TcpServer) -> None:
    data = read_all(conn)
    server.keep(data)
    conn.sendall(hashlib.sha256(data).hexdigest().encode())


def greet_then_half_close(conn: socket.socket, server: TcpServer) -> None:
    conn.sendall(b"hello, then goodbye")
    conn.shutdown(socket.SHUT_WR)
    server.keep(read_all(conn))


def server_first(conn: socket.socket, server: TcpServer) -> None:
    conn.sendall(b"220 banner\r\n")
    echo(conn, server)


def named(name: bytes) -> Callable[[socket.socket, TcpServer], None]:
    def handler(conn: socket.socket, server: TcpServer) -> None:
        conn.sendall(name)
        echo(conn, server)

    return handler


def self_signed(name: str, folder: Any) -> tuple[str, str]:
    """A throw-away certificate and key for `name` (files in `folder`)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def tls(name: bytes, cert: str, key: str) -> Callable[[socket.socket, TcpServer], None]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)

    def handler(conn: socket.socket, server: TcpServer) -> None:
        with context.wrap_socket(conn, server_side=True) as wrapped:
            wrapped.sendall(name)
            server.keep(wrapped.recv(1024))

    return handler


def tls_client_name(port: int, server_name: str, host: str = "127.0.0.1") -> bytes:
    """Connect with TLS (SNI `server_name`, the certificate checked against that name) and read the server's name."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection((host, port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as conn:
            name = conn.recv(1024)
            conn.sendall(b"bye")
            return name


def exchange(port: int, data: bytes, host: str = "127.0.0.1", timeout: float = 20.0) -> bytes:
    """Send `data`, half-close, read until the other side closes (b"" when the proxy closed or reset it first)."""
    with socket.create_connection((host, port), timeout=timeout) as conn:
        try:
            conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
            return read_all(conn)
        except (ConnectionResetError, BrokenPipeError, OSError) as exc:
            if isinstance(exc, TimeoutError):
                raise
            return b""


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus metric's samples whose labels include `labels` (0 when none)."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total
