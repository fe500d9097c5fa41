"""Compiled request matchers: one HTTPMatchRequest block -> one RouteMatch (an Envoy route match).

All comparisons are on bytes prepared at compile time: lower-cased header names,
encoded values, RE2 programs (full match, as Istio), lower-cased prefixes for
`ignoreUriCase`. Within a block all conditions AND; blocks of one HTTPRoute OR
(they become separate Envoy routes, in order).

What each condition reads (Envoy's view of an HTTP/1 request):

* `uri`: the path after dot-segment removal, without query or fragment;
  `ignoreUriCase` lowers exact and prefix (ASCII), never regex.
* `method`, `authority`, `scheme`: the request method, the Host (or the
  authority of an absolute-form target) as sent, with its port; scheme is
  always `http` on a plaintext listener.
* `headers`: names are case-insensitive (lower-cased at load); a header sent on
  several lines holds when any one value matches. The pseudo-header keys
  `:method`, `:authority`, `:scheme`, `:path` read the method, authority, `http`
  and Envoy's `:path` (normalized path plus `?query`); they are never in an
  HTTP/1 header list. Keys `uri`, `scheme`, `method`, `authority` are ignored
  (they have their own fields), as Istio does.
* `withoutHeaders`: the inverse; a missing header counts as the empty value,
  and `{}` there means "absent".
* `queryParams`: Envoy's router parses the query without percent-decoding; the
  first value of a repeated key counts, `?key` alone has the value "".
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Final, Protocol

import re2

from ..istio import model as m
from ..istio.values import compile_regex

log = logging.getLogger("meshproxy.routing")

SCHEME_HTTP: Final = b"http"

# Where a header condition reads its value.
FROM_HEADERS: Final = 0
FROM_METHOD: Final = 1
FROM_AUTHORITY: Final = 2
FROM_SCHEME: Final = 3
FROM_PATH: Final = 4
PSEUDO_HEADER_SOURCES: Final = {":method": FROM_METHOD, ":authority": FROM_AUTHORITY, ":scheme": FROM_SCHEME,
                         ":path": FROM_PATH}
# Istio ignores these keys in `headers`/`withoutHeaders`: they have their own fields.
IGNORED_HEADER_KEYS: Final = frozenset({"uri", "scheme", "method", "authority"})


class MatchInput(Protocol):
    """What a matcher reads from a request head (http1.RequestHead provides it)."""

    method: bytes
    path: bytes  # normalized, without the query
    query: bytes
    authority: bytes
    headers: list[tuple[bytes, bytes]]  # names lower-case, in arrival order, repeats kept


def _fullmatch_test(compiled: Any) -> Callable[[bytes], bool]:
    """RE2 full match as a predicate. google-re2's `fullmatch` builds a match object through a
    generator (about 3.7 us); its underlying `RE2.Match` call answers the same question in 1.5 us.
    The fast path is used only when that private API is there and agrees with `fullmatch`."""
    raw = getattr(compiled, "_regexp", None)
    anchor = getattr(getattr(re2, "_Anchor", None), "ANCHOR_BOTH", None)
    if raw is not None and anchor is not None:
        match = raw.Match

        def test(value: bytes) -> bool:
            return match(anchor, value, 0, len(value))[0][0] >= 0

        try:
            if all(test(v) == (compiled.fullmatch(v) is not None) for v in (b"", b"/", b"/a/b?c")):
                return test
        except Exception as exc:  # noqa: BLE001 - any surprise from the private API: use the public one
            log.debug("RE2 private Match API unusable (%s); using fullmatch", exc)
    fullmatch = compiled.fullmatch
    return lambda value: fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class StringMatcher:
    """One Istio StringMatch, compiled. `test` is the predicate the hot path calls."""

    kind: str  # exact | prefix | regex | present
    value: bytes = b""  # lower-cased when ignore_case
    regex: Any = None
    ignore_case: bool = False
    test: Callable[[bytes], bool] = field(default=None, compare=False, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.test is None:
            object.__setattr__(self, "test", self._predicate())

    def _predicate(self) -> Callable[[bytes], bool]:
        kind, value = self.kind, self.value
        if kind == "regex":
            return _fullmatch_test(self.regex)  # ignoreUriCase never applies to regex
        if kind == "present":
            return lambda _: True
        if self.ignore_case:
            if kind == "exact":
                return lambda v: v.lower() == value
            return lambda v: v[: len(value)].lower() == value
        if kind == "exact":
            return value.__eq__
        return lambda v: v.startswith(value)

    @classmethod
    def compile(cls, match: m.StringMatch, ignore_case: bool = False) -> StringMatcher:
        if match.kind == "regex":
            # The loader compiled it already; a model built by hand (tests, tools) may not carry it.
            return cls("regex", regex=match.regex if match.regex is not None else compile_regex(match.value))
        if match.kind == "present":
            return cls("present")
        value = match.value.encode()
        return cls(match.kind, value.lower() if ignore_case else value, ignore_case=ignore_case)

    def matches(self, value: bytes) -> bool:
        return self.test(value) is True

    def describe(self) -> str:
        if self.kind == "present":
            return "present"
        shown = self.regex.pattern if self.kind == "regex" else self.value
        text = shown.decode("utf-8", "replace") if isinstance(shown, bytes) else shown
        return f"{self.kind} {text!r}" + (" (ignoring case)" if self.ignore_case else "")


def _pseudo_value(source: int, req: MatchInput) -> bytes:
    if source == FROM_METHOD:
        return req.method
    if source == FROM_AUTHORITY:
        return req.authority
    if source == FROM_SCHEME:
        return SCHEME_HTTP
    return req.path + b"?" + req.query if req.query else req.path


@dataclass(frozen=True, slots=True)
class HeaderMatcher:
    """Holds when any one line of the header matches (Envoy 1.40); `invert` is withoutHeaders."""

    name: bytes  # lower-case; a pseudo-header keeps its ':' name
    matcher: StringMatcher
    invert: bool = False
    source: int = FROM_HEADERS

    def matches(self, req: MatchInput) -> bool:
        test = self.matcher.test
        if self.source:
            return test(_pseudo_value(self.source, req)) is not self.invert
        name = self.name
        found = False
        for key, value in req.headers:
            if key == name:
                if test(value):
                    return not self.invert
                found = True
        if found or not self.invert:
            return self.invert
        # withoutHeaders: a missing header counts as empty; `{}` means "must be absent".
        return self.matcher.kind == "present" or not test(b"")


@dataclass(frozen=True, slots=True)
class QueryMatcher:
    name: bytes
    matcher: StringMatcher

    def matches(self, params: dict[bytes, bytes]) -> bool:
        value = params.get(self.name)
        return value is not None and self.matcher.test(value)


def parse_query(query: bytes) -> dict[bytes, bytes]:
    """First value of each parameter, as sent (Envoy's router does not percent-decode for matching);
    `?key` alone has the value b""."""
    params: dict[bytes, bytes] = {}
    for part in query.split(b"&"):
        if part:
            key, _, value = part.partition(b"=")
            params.setdefault(key, value)
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
    beyond_path: bool = field(init=False, default=False, compare=False, repr=False)  # any condition but uri?

    def __post_init__(self) -> None:
        object.__setattr__(self, "beyond_path", bool(self.method or self.scheme or self.authority or self.headers
                                                     or self.query or self.port is not None))

    @property
    def catch_all(self) -> bool:
        return not (self.path or self.method or self.scheme or self.authority or self.headers or self.query
                    or self.port is not None)

    @property
    def matches_every_path(self) -> bool:
        """Only a uri condition that every path satisfies (`prefix: /`, `regex: .*`, `{}`), nothing else:
        Istio's catch-all (`isCatchAllRoute`)."""
        path = self.path
        if path is not None and not (path.kind == "present" or (path.kind == "prefix" and path.value == b"/")
                                     or (path.kind == "regex" and path.regex.pattern in (".*", "/.*"))):
            return False
        return replace(self, name="", path=None).catch_all

    def without_path(self) -> RouteMatch | None:
        """The conditions other than the uri, or None when there are none (for the path index)."""
        rest = replace(self, path=None)
        return None if rest.catch_all else rest

    def matches(self, req: MatchInput, port: int) -> bool:
        if self.path is not None and not self.path.test(req.path):
            return False
        if not self.beyond_path:
            return True
        if self.method is not None and not self.method.test(req.method):
            return False
        if self.port is not None and port != self.port:
            return False
        if self.authority is not None and not self.authority.test(req.authority):
            return False
        if self.scheme is not None and not self.scheme.test(SCHEME_HTTP):
            return False
        if self.headers:
            for header in self.headers:
                if not header.matches(req):
                    return False
        if self.query:
            params = parse_query(req.query)
            for q in self.query:
                if not q.matches(params):
                    return False
        return True

    def explain(self, req: MatchInput, port: int) -> str | None:
        """Why this block does not match (None when it does): for `meshproxy route`."""
        if self.path is not None and not self.path.test(req.path):
            return f"uri {req.path.decode('latin-1')!r} is not {self.path.describe()}"
        if self.method is not None and not self.method.test(req.method):
            return f"method {req.method.decode('latin-1')} is not {self.method.describe()}"
        if self.port is not None and port != self.port:
            return f"port {port} is not {self.port}"
        if self.authority is not None and not self.authority.test(req.authority):
            return f"authority {req.authority.decode('latin-1')!r} is not {self.authority.describe()}"
        if self.scheme is not None and not self.scheme.test(SCHEME_HTTP):
            return f"scheme http is not {self.scheme.describe()}"
        for header in self.headers:
            if not header.matches(req):
                name = header.name.decode()
                if header.source:
                    seen = _pseudo_value(header.source, req).decode("latin-1")
                    what = "must not be" if header.invert else "is not"
                    return f"header {name} {seen!r} {what} {header.matcher.describe()}"
                values = [v.decode("latin-1") for k, v in req.headers if k == header.name]
                if header.invert:
                    if header.matcher.kind == "present":
                        return f"header {name} must be absent, got {values!r}"
                    shown = values or "missing (counts as '')"
                    return f"header {name} must not be {header.matcher.describe()}, got {shown!r}"
                if not values:
                    return f"header {name} is missing, wanted {header.matcher.describe()}"
                return f"header {name} {values!r} is not {header.matcher.describe()}"
        if self.query:
            params = parse_query(req.query)
            for q in self.query:
                if not q.matches(params):
                    value = params.get(q.name)
                    got = "missing" if value is None else repr(value.decode("latin-1"))
                    return f"query parameter {q.name.decode()} ({got}) is not {q.matcher.describe()}"
        return None


CATCH_ALL: Final = RouteMatch()


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


def _header(name: str, match: m.StringMatch, invert: bool) -> HeaderMatcher:
    name = name.lower()
    return HeaderMatcher(name.encode(), StringMatcher.compile(match), invert, PSEUDO_HEADER_SOURCES.get(name, FROM_HEADERS))
