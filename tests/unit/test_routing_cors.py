"""CorsPolicy's origin decision, pure."""

from __future__ import annotations

from meshproxy.routing.cors import CorsPolicy
from meshproxy.routing.match import StringMatcher


def test_an_origin_matcher_accepting_star_allows_every_origin() -> None:
    star = CorsPolicy((StringMatcher("exact", b"*"),))
    assert star.allowed(b"https://anything.example") and star.allowed(b"null")
    listed = CorsPolicy((StringMatcher("exact", b"https://app.example"), StringMatcher("prefix", b"https://ops.")))
    assert listed.allowed(b"https://app.example") and listed.allowed(b"https://ops.example")
    assert not listed.allowed(b"https://evil.example")
    regex_star = CorsPolicy((StringMatcher("prefix", b""),))  # a prefix of "" matches "*" too, as in Envoy
    assert regex_star.allowed(b"https://any.example")
