"""CORS (HTTPRoute.corsPolicy) as Envoy's cors filter applies it: compiled once, decided per request. Pure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from .match import StringMatcher

ORIGIN: Final = b"origin"
REQUEST_METHOD: Final = b"access-control-request-method"


@dataclass(frozen=True, slots=True)
class CorsPolicy:
    origins: tuple[StringMatcher, ...]
    allow_methods: bytes = b""
    allow_headers: bytes = b""
    expose_headers: bytes = b""
    max_age: bytes = b""
    allow_credentials: bool = False
    forward_unmatched_preflight: bool = True  # unmatchedPreflights: FORWARD (default) or IGNORE
    any_origin: bool = field(init=False, compare=False, default=False)  # computed once: see allowed()

    def __post_init__(self) -> None:
        object.__setattr__(self, "any_origin", any(m.matches(b"*") for m in self.origins))

    def allowed(self, origin: bytes) -> bool:
        """Envoy: an origin matcher that accepts the literal "*" allows every origin."""
        return self.any_origin or any(m.matches(origin) for m in self.origins)

    def preflight_reply(self, origin: bytes) -> tuple[tuple[bytes, bytes], ...]:
        """Headers of the proxy's own 200 answer to an allowed preflight."""
        out = [(b"access-control-allow-origin", origin)]
        if self.allow_methods:
            out.append((b"access-control-allow-methods", self.allow_methods))
        if self.allow_headers:
            out.append((b"access-control-allow-headers", self.allow_headers))
        if self.max_age:
            out.append((b"access-control-max-age", self.max_age))
        if self.allow_credentials:
            out.append((b"access-control-allow-credentials", b"true"))
        return tuple(out)

    def response_headers(self, origin: bytes) -> tuple[tuple[bytes, bytes], ...]:
        """Headers added to the upstream's answer to an allowed (non-preflight) request."""
        out = [(b"access-control-allow-origin", origin)]
        if self.allow_credentials:
            out.append((b"access-control-allow-credentials", b"true"))
        if self.expose_headers:
            out.append((b"access-control-expose-headers", self.expose_headers))
        return tuple(out)


def join(values: Sequence[str]) -> bytes:
    return ",".join(values).encode()
