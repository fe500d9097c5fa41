"""Compiled request matchers: one HTTPMatchRequest block -> one RouteMatch (an Envoy route match).

All comparisons are on bytes prepared at compile time: lower-cased header names,
encoded values, RE2 programs (full match, as Istio), lower-cased prefixes for
`ignoreUriCase`. Within a block all conditions AND; blocks of one HTTPRoute OR
(they become separate Envoy routes, in order).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import unquote_to_bytes

from ..istio import model as m
from ..istio.load import compile_regex


class MatchInput(Protocol):
    """What a matcher reads from a request head (http1.RequestHead provides it)."""

    method: bytes
    path: bytes  # normalized, without the query
    query: bytes
    authority: bytes
    headers: list[tuple[bytes, bytes]]  # names lower-case, in arrival order, repeats kept


@dataclass(frozen=True, slots=True)
class StringMatcher:
    kind: str  # exact | prefix | regex | present
    value: bytes = b""
    regex: Any = None
    ignore_case: bool = False

    @classmethod
    def compile(cls, match: m.StringMatch, ignore_case: bool = False) -> StringMatcher:
        if match.kind == "regex":
            return cls("regex", regex=compile_regex(match.value))  # ignoreUriCase never applies to regex
        value = match.value.encode()
        return cls(match.kind, value.lower() if ignore_case else value, ignore_case=ignore_case)

    def matches(self, value: bytes) -> bool:
        kind = self.kind
        if self.ignore_case:
            value = value.lower()
        if kind == "exact":
            return value == self.value
        if kind == "prefix":
            return value.startswith(self.value)
        if kind == "regex":
            return self.regex.fullmatch(value) is not None
        return True  # present

    def describe(self) -> str:
        if self.kind == "present":
            return "present"
        shown = self.regex.pattern if self.kind == "regex" else self.value
        text = shown.decode("utf-8", "replace") if isinstance(shown, bytes) else shown
        return f"{self.kind} {text!r}" + (" (ignoring case)" if self.ignore_case else "")


@dataclass(frozen=True, slots=True)
class HeaderMatcher:
    """Holds when any one line of the header matches (Envoy 1.40); `invert` is withoutHeaders."""

    name: bytes
    matcher: StringMatcher
    invert: bool = False

    def matches(self, headers: list[tuple[bytes, bytes]]) -> bool:
        name, matcher = self.name, self.matcher
        found = False
        for key, value in headers:
            if key == name:
                found = True
                if matcher.matches(value):
                    return not self.invert
        if found or not self.invert:
            return self.invert
        # withoutHeaders: a missing header counts as empty; `{}` means "must be absent".
        return matcher.kind == "present" or not matcher.matches(b"")


@dataclass(frozen=True, slots=True)
class QueryMatcher:
    name: bytes
    matcher: StringMatcher

    def matches(self, params: dict[bytes, bytes]) -> bool:
        value = params.get(self.name)
        return value is not None and self.matcher.matches(value)


def parse_query(query: bytes) -> dict[bytes, bytes]:
    """First value of each parameter, percent-decoded (`?key` alone has value b"")."""
    params: dict[bytes, bytes] = {}
    for part in query.split(b"&"):
        if part:
            key, _, value = part.partition(b"=")
            params.setdefault(unquote_to_bytes(key), unquote_to_bytes(value.replace(b"+", b" ")))
    return params


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """One match block, compiled. Empty = catch-all."""

    name: str = ""
    path: StringMatcher | None = None
    method: StringMatcher | None = None
    scheme: StringMatcher | None = None
    authority: StringMatcher | None = None
    headers: tuple[HeaderMatcher, ...] = ()
    query: tuple[QueryMatcher, ...] = ()
    port: int | None = None

    @property
    def catch_all(self) -> bool:
        return not (self.path or self.method or self.scheme or self.authority or self.headers or self.query or self.port)

    def matches(self, req: MatchInput, port: int) -> bool:
        if self.path is not None and not self.path.matches(req.path):
            return False
        if self.method is not None and not self.method.matches(req.method):
            return False
        if self.port is not None and port != self.port:
            return False
        if self.authority is not None and not self.authority.matches(req.authority):
            return False
        if self.scheme is not None and not self.scheme.matches(b"http"):
            return False
        for header in self.headers:
            if not header.matches(req.headers):
                return False
        if self.query:
            params = parse_query(req.query)
            for q in self.query:
                if not q.matches(params):
                    return False
        return True

    def explain(self, req: MatchInput, port: int) -> str | None:
        """Why this block does not match (None when it does): for `meshproxy route`."""
        if self.path is not None and not self.path.matches(req.path):
            return f"uri {req.path.decode('latin-1')!r} is not {self.path.describe()}"
        if self.method is not None and not self.method.matches(req.method):
            return f"method {req.method.decode('latin-1')} is not {self.method.describe()}"
        if self.port is not None and port != self.port:
            return f"port {port} is not {self.port}"
        if self.authority is not None and not self.authority.matches(req.authority):
            return f"authority {req.authority.decode('latin-1')!r} is not {self.authority.describe()}"
        if self.scheme is not None and not self.scheme.matches(b"http"):
            return f"scheme http is not {self.scheme.describe()}"
        for header in self.headers:
            if not header.matches(req.headers):
                what = "must not be" if header.invert else "is not"
                return f"header {header.name.decode()} {what} {header.matcher.describe()}"
        if self.query:
            params = parse_query(req.query)
            for q in self.query:
                if not q.matches(params):
                    return f"query parameter {q.name.decode()} is not {q.matcher.describe()}"
        return None


CATCH_ALL = RouteMatch()


def compile_match(block: m.HTTPMatchRequest) -> RouteMatch:
    ic = block.ignore_uri_case
    return RouteMatch(
        name=block.name,
        path=StringMatcher.compile(block.uri, ic) if block.uri else None,
        method=StringMatcher.compile(block.method) if block.method else None,
        scheme=StringMatcher.compile(block.scheme) if block.scheme else None,
        authority=StringMatcher.compile(block.authority) if block.authority else None,
        headers=tuple(_header(name, sm, False) for name, sm in block.headers if name not in IGNORED_HEADER_KEYS)
        + tuple(_header(name, sm, True) for name, sm in block.without_headers if name not in IGNORED_HEADER_KEYS),
        query=tuple(QueryMatcher(name.encode(), StringMatcher.compile(sm)) for name, sm in block.query_params),
        port=block.port,
    )


# Istio ignores these keys in `headers` (they have their own fields); pseudo-headers map to HTTP/1 ones.
IGNORED_HEADER_KEYS = frozenset({"uri", "scheme", "method", "authority"})
PSEUDO_TO_HTTP1 = {":authority": b"host", ":method": b":method", ":path": b":path", ":scheme": b":scheme"}


def _header(name: str, match: m.StringMatch, invert: bool) -> HeaderMatcher:
    key = PSEUDO_TO_HTTP1.get(name, name.encode())
    return HeaderMatcher(key, StringMatcher.compile(match), invert)
