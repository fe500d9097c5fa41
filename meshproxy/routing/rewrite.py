"""Path and authority rewrites (HTTPRewrite), compiled once per route, applied per request. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

ORIGINAL_PATH: Final = b"x-envoy-original-path"


@dataclass(frozen=True, slots=True)
class Rewrite:
    """Envoy prefix_rewrite / regex_rewrite / host_rewrite_literal of one route (one match block)."""

    strip: bytes | None = None  # the matched prefix (or exact path) that `prefix` replaces
    strip_ignore_case: bool = False
    prefix: bytes = b""
    regex: Any = None  # RE2 program; every match is substituted (RE2::GlobalReplace)
    substitution: bytes = b""
    authority: bytes = b""

    @property
    def rewrites_path(self) -> bool:
        return self.strip is not None or self.regex is not None

    def path(self, path: bytes) -> bytes:
        """The upstream path (without the query) for a request path this route matched."""
        if self.regex is not None:
            return self.regex.sub(self.substitution, path)
        strip = self.strip
        if strip is None:
            return path
        head = path[: len(strip)]
        if head == strip or (self.strip_ignore_case and head.lower() == strip.lower()):
            return self.prefix + path[len(strip):]
        return path


DEFAULT_PORTS: Final = {b"http": 80, b"https": 443}


@dataclass(frozen=True, slots=True)
class Redirect:
    """HTTPRedirect of one route (Envoy RedirectAction): builds the Location header."""

    code: int = 301
    scheme: bytes = b""  # empty: the request's (http)
    host: bytes = b""  # empty: the request's
    port: int | None = None
    derive_port: str = ""  # FROM_PROTOCOL_DEFAULT | FROM_REQUEST_PORT
    path: bytes = b""  # redirect.uri: replaces the whole path
    strip: bytes | None = None  # with prefix_rewrite: the matched prefix it replaces
    prefix: bytes = b""

    def location(self, authority: bytes, path: bytes, query: bytes) -> bytes:
        scheme = self.scheme or b"http"
        req_host, sep, req_port = authority.rpartition(b":")
        if not sep or not req_port.isdigit():
            req_host, req_port = authority, b""
        host = self.host or req_host
        port: int | None = None
        if self.port is not None:
            port = self.port
        elif self.derive_port == "FROM_REQUEST_PORT" and req_port:
            port = int(req_port)
        elif not self.derive_port and not self.host and not self.scheme and req_port:
            port = int(req_port)  # nothing about the authority changes: keep it whole
        if self.path:
            new_path, sep, new_query = self.path.partition(b"?")
            query = new_query if sep else query  # a query in redirect.uri replaces the request's
            path = new_path
        elif self.strip is not None and path.startswith(self.strip):
            path = self.prefix + path[len(self.strip):]
        netloc = host if port is None or DEFAULT_PORTS.get(scheme) == port else host + b":%d" % port
        return scheme + b"://" + netloc + path + (b"?" + query if query else b"")
