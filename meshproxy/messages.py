"""Protocol-neutral messages: the request head and the events a codec reports, whatever the wire version.

A codec builds one `RequestHead` per request, validated; the exchange, routing and telemetry read it and never see
the wire. A server codec reports a request as `RequestEvents`, a client codec a response as `ResponseEvents`: the
same calls for HTTP/1.1 (`http1/`) and any codec beside it. Both are mypyc traits, so that a transport can be one
beside its own base class and compiled code still calls it natively.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from mypy_extensions import trait

HTTP11: Final = b"1.1"
HTTP10: Final = b"1.0"
HTTP2: Final = b"2"


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
        self.version = version  # b"1.1", b"1.0" or b"2"
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


class HeaderTemplate:
    """Headers the proxy adds, with names fixed when it is made and values given per request, or fixed too when
    known up front (this workload's peer metadata). A codec encodes a template's names once and keeps the result
    on it (HTTP/1.1's `http1`: the text around the values), so a block of added headers costs one step on the
    wire, not one per name, separator and value (measured for the seams issue: a third of the instructions)."""

    __slots__ = ("names", "fixed", "http1")

    def __init__(self, names: tuple[bytes, ...], fixed: tuple[bytes, ...] = ()) -> None:
        self.names = names
        self.fixed = fixed  # the values, when fixed: such a block is used with no values of its own, `()`
        self.http1: tuple[bytes, ...] = ()  # HTTP/1.1's encoding, made by http1/wire.py at first use

    def __repr__(self) -> str:
        return f"HeaderTemplate({self.names!r})"


HeaderBlock = tuple[HeaderTemplate, tuple[bytes, ...]]  # a template and this request's values for it

_TEMPLATES: Final[dict[tuple[bytes, ...], HeaderTemplate]] = {}


def template_of(names: tuple[bytes, ...]) -> HeaderTemplate:
    """The one template for these names, for code whose set of names varies per request (trace propagation's);
    callers use a finite set of names, so this stays small."""
    template = _TEMPLATES.get(names)
    if template is None:
        template = _TEMPLATES[names] = HeaderTemplate(names)
    return template


def constant_block(pairs: tuple[tuple[bytes, bytes], ...]) -> tuple[HeaderBlock, ...]:
    """Headers whose values are known up front, as blocks to add (none when `pairs` is empty)."""
    if not pairs:
        return ()
    return ((HeaderTemplate(tuple(n for n, _ in pairs), tuple(v for _, v in pairs)), ()),)


def block_pairs(blocks: Iterable[HeaderBlock]) -> list[tuple[bytes, bytes]]:
    """Blocks as (name, value) pairs, for a local reply's headers (the HTTP/2 codec encodes blocks in place)."""
    out: list[tuple[bytes, bytes]] = []
    for template, values in blocks:
        names = template.names
        if template.fixed:
            values = template.fixed
        for i in range(len(names)):
            out.append((names[i], values[i]))
    return out


@trait
class RequestEvents:
    """A request, as a server codec reports it: the head, body chunks, the end or trailers (which end it)."""

    __slots__ = ()

    def on_request_head(self, head: RequestHead) -> None:  # may raise the codec's error (a pipelining limit)
        raise NotImplementedError

    def on_request_body(self, data: bytes) -> None:
        raise NotImplementedError

    def on_request_end(self) -> None:
        raise NotImplementedError

    def on_request_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        """The request ended with trailers (HTTP/2; HTTP/1.1's are dropped, as Envoy without enable_trailers)."""
        raise NotImplementedError


@trait
class ResponseEvents:
    """A response, as a client codec reports it: the head (`content_length` None when unknown; `end_stream` when
    no body follows), body chunks, the end."""

    __slots__ = ()

    def on_response_head(self, status: int, headers: list[tuple[bytes, bytes]], content_length: int | None,
                         end_stream: bool) -> None:
        raise NotImplementedError

    def on_response_body(self, data: bytes) -> None:
        raise NotImplementedError

    def on_response_end(self) -> None:
        raise NotImplementedError

    def on_response_trailers(self, trailers: list[tuple[bytes, bytes]]) -> None:
        """The response ended with trailers (HTTP/2, e.g. gRPC's grpc-status); no on_response_end follows."""
        raise NotImplementedError
