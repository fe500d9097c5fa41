"""The opt-in retry on a grpc-status in trailers (meshproxy.io/retry-grpc-trailers): the annotation as the loader reads
and refuses it, its compiled form in the route's retry policy, and the exchange's pure decisions (what is held, which
trailers are retried, when the first message is whole)."""

from __future__ import annotations

import random
import textwrap

import pytest

from meshproxy.http2.grpc import MessageCounter
from meshproxy.istio.load import load_text, snapshot_of
from meshproxy.istio.problems import Problem
from meshproxy.istio.retry_annotation import RETRY_GRPC_TRAILERS
from meshproxy.proxy.retry import holds_for_trailers, retriable_grpc_status
from meshproxy.routing.compile import Identity, compile_table
from meshproxy.routing.describe import describe_retry
from meshproxy.routing.policy import RetryPolicy, Route

FIELD = f"metadata.annotations.{RETRY_GRPC_TRAILERS}"
SERVICE = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: backend}
spec:
  hosts: [backend.default.svc.cluster.local]
  ports: [{number: 80, name: grpc, protocol: GRPC}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.1}]
"""
ROUTES = """\
- name: get
  match: [{uri: {prefix: /pkg.Users/Get}}]
  retries: {attempts: 2, retryOn: unavailable}
  route: [{destination: {host: backend}}]
- name: moved
  match: [{uri: {prefix: /old}}]
  redirect: {uri: /new}
- name: rest
  route: [{destination: {host: backend}}]
"""


def vs(annotation: str | None, http: str = ROUTES) -> str:
    body = textwrap.indent(http.strip(), "  ")
    meta = f"\n  annotations: {{{RETRY_GRPC_TRAILERS}: '{annotation}'}}" if annotation is not None else ""
    return ("apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
            f"metadata:\n  name: backend{meta}\nspec:\n  hosts: [backend]\n  http:\n{body}\n")


def load(text: str) -> tuple[list, list[Problem]]:
    problems: list[Problem] = []
    return load_text(text, "vs.yaml", problems), problems


def routes(annotation: str | None, http: str = ROUTES, identity: Identity = Identity()) -> tuple[dict[str, Route],
                                                                                                 list[Problem]]:
    problems: list[Problem] = []
    resources = load_text(SERVICE, "se.yaml", problems) + load_text(vs(annotation, http), "vs.yaml", problems)
    assert [p for p in problems if p.severity == "error"] == []
    table, warnings = compile_table(snapshot_of(resources), identity)
    vhost = table.exact["backend.default.svc.cluster.local"]
    return {route.name: route for route in vhost.routes}, problems + warnings


# ---------------------------------------------------------------- the annotation, read and compiled

def test_off_unless_the_annotation_is_there() -> None:
    compiled, problems = routes(None)
    assert {name: r.retry.grpc_trailers_bytes for name, r in compiled.items()} == {"get": 0, "moved": 0, "rest": 0}
    assert problems == []


@pytest.mark.parametrize(("annotation", "held"), [
    ("4096", {"get": 4096, "moved": 0, "rest": 4096}),  # every route that goes upstream
    ("4Ki", {"get": 4096, "moved": 0, "rest": 4096}),
    (" 1Mi ", {"get": 1 << 20, "moved": 0, "rest": 1 << 20}),
    ("get=512", {"get": 512, "moved": 0, "rest": 0}),
    ("get = 2Ki , rest=1", {"get": 2048, "moved": 0, "rest": 1}),
])
def test_the_annotation_sets_the_bound_of_the_routes_it_names(annotation: str, held: dict[str, int]) -> None:
    compiled, problems = routes(annotation)
    assert {name: r.retry.grpc_trailers_bytes for name, r in compiled.items()} == held
    assert problems == []  # a known annotation: no "unknown meshproxy annotation" warning
    assert compiled["get"].retry.num_retries == 2  # the rest of the policy is the route's own
    assert compiled["rest"].retry.retry_on == RetryPolicy.compile(2, "connect-failure,refused-stream,unavailable,"
                                                                     "cancelled,retriable-status-codes").retry_on


def test_meshproxy_routes_shows_the_bound() -> None:
    compiled, _ = routes("get=4Ki")
    assert describe_retry(compiled["get"]) == "2 retries on unavailable, gRPC trailers held up to 4096 bytes"
    assert "held" not in describe_retry(compiled["rest"])


def test_a_mesh_default_policy_without_grpc_conditions_holds_nothing_and_says_so() -> None:
    identity = Identity(default_retry=RetryPolicy.compile(2, "connect-failure"))
    compiled, problems = routes("1Ki", identity=identity)
    assert compiled["rest"].retry.grpc_trailers_bytes == 0 and compiled["get"].retry.grpc_trailers_bytes == 1024
    (warning,) = problems
    assert (warning.file, warning.path, warning.severity) == ("vs.yaml", FIELD, "warning")
    assert "spec.http[2] retries no gRPC status" in warning.message


NO_RETRY_ON_GRPC = """\
- name: get
  retries: {attempts: 2, retryOn: 5xx}
  route: [{destination: {host: backend}}]
"""
NO_ATTEMPTS = """\
- route: [{destination: {host: backend}}]
- retries: {attempts: 0}
  route: [{destination: {host: backend}}]
"""
ONLY_REDIRECTS = """\
- name: moved
  redirect: {uri: /new}
"""


@pytest.mark.parametrize(("annotation", "http", "fragment"), [
    ("", ROUTES, "'' is not a size in bytes (like 4096, 4Ki or 1Mi)"),
    ("lots", ROUTES, "'lots' is not a size in bytes"),
    ("-1", ROUTES, "'-1' is not a size in bytes"),
    ("4KB", ROUTES, "'4KB' is not a size in bytes"),
    ("0", ROUTES, "'0': the size must be between 1 and 1Mi bytes"),
    ("2Mi", ROUTES, "'2Mi': the size must be between 1 and 1Mi bytes"),
    ("get=", ROUTES, "'' for route 'get' is not a size in bytes"),
    ("get=4Ki,rest", ROUTES, "'rest' is not ROUTE-NAME=SIZE"),
    ("=4Ki", ROUTES, "'=4Ki' is not ROUTE-NAME=SIZE"),
    ("nope=4Ki", ROUTES, "no http route is named 'nope' (names: 'get', 'moved', 'rest')"),
    ("get=1,get=2", ROUTES, "route 'get' is named twice"),
    ("get=1,rest=2,get=x", ROUTES, "route 'get' is named twice"),
    ("moved=1Ki", ROUTES, "route 'moved' (spec.http[1]) has no destination: nothing to retry"),
    ("1Ki", ONLY_REDIRECTS, "no http route of the VirtualService has a destination"),
    ("get=1Ki", NO_RETRY_ON_GRPC, "route 'get' (spec.http[0]): its retryOn '5xx' has no gRPC condition"),
    ("1Ki", NO_ATTEMPTS, "spec.http[1]: its retries are disabled (attempts: 0)"),
])
def test_a_bad_annotation_is_an_error_naming_the_field(annotation: str, http: str, fragment: str) -> None:
    resources, problems = load(vs(annotation, http))
    errors = [p for p in problems if p.severity == "error"]
    assert resources == [] and len(errors) == 1, errors  # the document is refused, the rest of the snapshot kept
    (error,) = errors
    assert (error.file, error.doc, error.path) == ("vs.yaml", 0, FIELD)
    assert fragment in error.message
    assert str(error).startswith(f"vs.yaml:0: {FIELD}: ")


def test_a_virtual_service_without_http_routes_cannot_have_it() -> None:
    text = vs("1Ki", "").replace("  http:\n", "  tcp: [{route: [{destination: {host: backend}}]}]\n")
    _, problems = load(text)
    assert [(p.path, p.message) for p in problems] == [(FIELD, "the VirtualService has no http routes to retry")]


# ---------------------------------------------------------------- the exchange's decisions

HELD = RetryPolicy.compile(2, "unavailable,cancelled")
ON = RetryPolicy(HELD.num_retries, HELD.retry_on, grpc_trailers_bytes=100)
GRPC_HEAD = [(b"content-type", b"application/grpc"), (b"x-call", b"1")]  # 35 bytes of names and values


@pytest.mark.parametrize(("policy", "status", "headers", "left"), [
    (ON, 200, GRPC_HEAD, 65),
    (ON, 200, [(b"content-type", b"application/grpc+proto")], 100 - 12 - 22),
    (ON, 200, [(b"content-type", b"application/grpc-web")], 0),  # gRPC-web: left as Envoy does
    (ON, 200, [(b"content-type", b"application/json")], 0),
    (ON, 200, [], 0),
    (ON, 503, GRPC_HEAD, 0),  # not a gRPC answer: judged by its status, as any response
    (ON, 200, GRPC_HEAD + [(b"x-pad", b"p" * 60)], 0),  # the head alone fills the bound
    (ON, 200, GRPC_HEAD + [(b"x-pad", b"p" * 59)], 1),
    (HELD, 200, GRPC_HEAD, 0),  # off
])
def test_what_is_held(policy: RetryPolicy, status: int, headers: list[tuple[bytes, bytes]], left: int) -> None:
    assert holds_for_trailers(policy, status, headers) == left


@pytest.mark.parametrize(("trailers", "code"), [
    ([(b"grpc-status", b"14"), (b"grpc-message", b"later")], b"14"),
    ([(b"grpc-message", b"x"), (b"grpc-status", b" 1 ")], b"1"),
    ([(b"grpc-status", b"13")], b""),  # internal: not in this retryOn
    ([(b"grpc-status", b"0")], b""),
    ([(b"x-other", b"14")], b""),
    ([], b""),
])
def test_which_trailers_are_retried(trailers: list[tuple[bytes, bytes]], code: bytes) -> None:
    assert retriable_grpc_status(ON, trailers) == code


def frame(payload: bytes) -> bytes:
    return b"\0" + len(payload).to_bytes(4, "big") + payload


def test_the_first_message_is_whole_wherever_the_body_is_cut() -> None:
    rng = random.Random(18)
    for first in (b"", b"a", bytes(300)):
        body = frame(first) + frame(b"second")
        whole_at = len(frame(first))
        for _ in range(50):
            counter = MessageCounter()
            position = 0
            for cut in sorted(rng.sample(range(1, len(body)), 4)) + [len(body)]:
                counter.feed(body[position:cut])
                position = cut
                assert counter.first_complete() == (position >= whole_at)
