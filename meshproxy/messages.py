"""Protocol-neutral request heads: what a codec hands the exchange, whatever the wire version.

A codec builds one per request, validated; the exchange, routing and telemetry read it and never see the wire.
"""

from __future__ import annotations

from typing import Final

HTTP11: Final = b"1.1"
HTTP10: Final = b"1.0"


class RequestHead:
    """A parsed request head. A plain class, not a dataclass: built once per request, and a dataclass's generated
    __init__ stays interpreted when the module is compiled (3.7k instructions against a few hundred)."""

    __slots__ = ("method", "target", "path", "query", "authority", "headers", "version", "keep_alive",
                 "content_length", "chunked", "expect_continue", "connection_tokens")

    def __init__(self, method: bytes, target: bytes, path: bytes, query: bytes, authority: bytes,
                 headers: list[tuple[bytes, bytes]], version: bytes, keep_alive: bool, content_length: int | None,
                 chunked: bool, expect_continue: bool, connection_tokens: frozenset[bytes]) -> None:
        self.method = method
        self.target = target  # request-target as sent
        self.path = path  # origin-form path, dot-segments removed, without the query
        self.query = query  # without the "?"
        self.authority = authority  # Host, or the authority of an absolute-form target
        self.headers = headers  # (lower-case name, value), arrival order
        self.version = version  # b"1.1" or b"1.0"
        self.keep_alive = keep_alive
        self.content_length = content_length
        self.chunked = chunked
        self.expect_continue = expect_continue
        self.connection_tokens = connection_tokens  # extra hop-by-hop names listed in Connection

    def __repr__(self) -> str:
        return f"RequestHead({self.method!r} {self.target!r} HTTP/{self.version.decode()}, {len(self.headers)} headers)"

    def header(self, name: bytes) -> bytes | None:
        """First value of a header (names are lower-case)."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def path_and_query(self) -> bytes:
        return self.path + b"?" + self.query if self.query else self.path
