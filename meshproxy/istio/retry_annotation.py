"""The annotation `meshproxy.io/retry-grpc-trailers` of a VirtualService (a meshproxy extension, off unless set).

Envoy retries a gRPC call only when its status comes in the response headers (trailers-only); a server that sends
its headers first (custom initial metadata, grpcio's abort after `send_initial_metadata`, Akka...) puts the status in
trailers, and nothing is retried (envoy#17629, linkerd2#7701). With this annotation the proxy holds such a response,
up to a number of bytes, until its trailers say whether to retry. Istio has no field for it, and a VirtualService
must stay portable (istioctl rejects unknown spec fields), hence an annotation:

    meshproxy.io/retry-grpc-trailers: "4Ki"                          # every http route of the VirtualService
    meshproxy.io/retry-grpc-trailers: "get-user=4096, list=16Ki"     # only the http routes with these names

A size is a positive integer of bytes, or with `Ki` or `Mi`, at most 1Mi. The routes' retry policy (attempts,
retryOn with gRPC conditions, perTryTimeout) decides as for any retry. Problems are errors naming the field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Final

from . import model as m
from .problems import DocProblems
from .values import retry_on_tokens

RETRY_GRPC_TRAILERS: Final = "meshproxy.io/retry-grpc-trailers"
MAX_HELD_BYTES: Final = 1 << 20  # each held response is memory per request in flight
GRPC_RETRY_ON: Final = ("cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable")
SIZE_RE: Final = re.compile(r"([0-9]{1,8})(Ki|Mi)?")
UNITS: Final = {None: 1, "Ki": 1 << 10, "Mi": 1 << 20}
FIELD: Final = f"metadata.annotations.{RETRY_GRPC_TRAILERS}"


def held_bytes(doc: DocProblems, annotations: Mapping[str, str], http: Sequence[m.HTTPRoute]) -> dict[int, int]:
    """The annotation resolved against the VirtualService's http routes: http route index -> bytes held ({} when
    the annotation is absent, or wrong: then `doc` has the errors)."""
    raw = annotations.get(RETRY_GRPC_TRAILERS)
    if raw is None:
        return {}
    text = raw.strip()
    if not http:
        doc.error(FIELD, "the VirtualService has no http routes to retry")
        return {}
    chosen: dict[int, int] = {}
    if "=" not in text:  # one size for every route that goes upstream (a redirect or direct response never does)
        size = _size(doc, text, "")
        if size is None:
            return {}
        chosen = {i: size for i, route in enumerate(http) if route.route}
        if not chosen:
            doc.error(FIELD, "no http route of the VirtualService has a destination: nothing to retry")
    else:
        index: dict[str, int] = {}
        for i, route in enumerate(http):
            if route.name:
                index.setdefault(route.name, i)  # Istio's names are unique; the first one, if not
        named: set[str] = set()
        for item in text.split(","):
            name, sep, value = (part.strip() for part in item.partition("="))
            if not sep or not name:
                doc.error(FIELD, f"{item.strip()!r} is not ROUTE-NAME=SIZE (the per-route form is "
                                 "'name=SIZE, other=SIZE'; a lone SIZE applies to every route)")
                continue
            if name not in index:
                known = ", ".join(repr(n) for n in index) or "none: give the http routes a name"
                doc.error(FIELD, f"no http route is named {name!r} (names: {known})")
                continue
            if name in named:
                doc.error(FIELD, f"route {name!r} is named twice")
                continue
            named.add(name)
            if not http[index[name]].route:
                doc.error(FIELD, f"route {name!r} (spec.http[{index[name]}]) has no destination: nothing to retry")
                continue
            size = _size(doc, value, f" for route {name!r}")
            if size is not None:
                chosen[index[name]] = size
    for i in list(chosen):
        problem = _retry_problem(http[i].retries)
        if problem:
            name = f"route {http[i].name!r} (spec.http[{i}])" if http[i].name else f"spec.http[{i}]"
            doc.error(FIELD, f"{name}: {problem}")
            del chosen[i]
    return chosen


def _size(doc: DocProblems, text: str, where: str) -> int | None:
    found = SIZE_RE.fullmatch(text)
    if found is None:
        doc.error(FIELD, f"{text!r}{where} is not a size in bytes (like 4096, 4Ki or 1Mi)")
        return None
    size = int(found.group(1)) * UNITS[found.group(2)]
    if not 0 < size <= MAX_HELD_BYTES:
        doc.error(FIELD, f"{text!r}{where}: the size must be between 1 and 1Mi bytes")
        return None
    return size


def _retry_problem(retries: m.HTTPRetry | None) -> str:
    """Why the route's own retry policy can never retry on a gRPC status ("" when it can, or when the route has none:
    the mesh's default policy, which retries unavailable and cancelled, is judged when routes are compiled)."""
    if retries is None:
        return ""
    if retries.attempts == 0:
        return "its retries are disabled (attempts: 0): nothing would be retried"
    if not any(token in GRPC_RETRY_ON for token in retry_on_tokens(retries.retry_on)) and retries.retry_on:
        return (f"its retryOn {retries.retry_on!r} has no gRPC condition ({', '.join(GRPC_RETRY_ON)}): "
                "nothing in trailers would be retried")
    return ""
