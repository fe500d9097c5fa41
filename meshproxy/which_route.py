""""Which route would this request take": a request given as method, URL and headers, explained against a compiled
table. `meshproxy route` prints the answer; the console's /console/api/route returns it as JSON."""

from __future__ import annotations

from dataclasses import dataclass

from .http1.errors import ProtocolError
from .http1.head import build_request_head
from .routing.describe import explain_request
from .routing.policy import Route
from .routing.table import RouteTable


@dataclass(frozen=True, slots=True)
class RouteAnswer:
    request: str  # the request as understood: method, path, query, authority, header count
    lines: list[str]  # explain_request's lines: the virtual host, each route tried and why not, the chosen one
    chosen: Route | None  # None: the request would get 404 NR


def which_route(table: RouteTable, method: str, url: str, headers: list[tuple[bytes, bytes]]) -> RouteAnswer:
    """URL is absolute (http://reviews:9080/reviews/0) or authority and path (reviews:9080/reviews/0); header names
    lower-case. ValueError when the request could not be sent as given."""
    target = url if "://" in url else f"http://{url}"
    try:
        head = build_request_head(method.upper().encode("latin-1"), target.encode("latin-1"), list(headers), "1.1",
                                  True)
    except (ProtocolError, UnicodeEncodeError) as exc:
        raise ValueError(f"{url!r}: {exc}") from None
    query = f"?{head.query.decode('latin-1')}" if head.query else ""
    request = (f"{head.method.decode()} {head.path.decode('latin-1')}{query}  "
               f"(authority {head.authority.decode('latin-1')!r}, {len(head.headers)} header line(s))")
    lines, chosen = explain_request(table, head)
    return RouteAnswer(request, lines, chosen)
