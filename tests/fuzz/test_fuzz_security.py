"""Hypothesis over security.istio.io: schema-guided AuthorizationPolicy / PeerAuthentication / RequestAuthentication
documents (every field of the schema, wrong types and hostile values mixed in).

Invariant: a document loads or is refused with problems; a snapshot that loads compiles into the workload's
policy; the policy answers any request (allowed, 401/403, or waiting for keys) and any token; nothing else is
raised.
"""

from __future__ import annotations

import math
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshproxy.istio import schema
from meshproxy.istio.load import load_text, snapshot_of
from meshproxy.messages import RequestHead
from meshproxy.security.jwt_authn import JwksCache
from meshproxy.security.policy import compile_workload_policy
from meshproxy.security.scope import Workload

from jwt_keys import ISSUER, SigningKey, jwks

KEY = SigningKey("k1")
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
STRINGS = ["*", "", "/admin", "/admin*", "*.html", "/a/{*}/b", "/a/{**}", "/{**}/x/{*}", "/a/{*}.txt", "GET", "get",
           "example.com", "Example.COM:80", "*.example.com", "10.0.0.0/8", "10.0.0.1", "::1/128", "300.1.1.1",
           "cluster.local/ns/default/sa/sleep", "default", "default/sleep", "*/sa/x", "80", "99999", "x",
           "request.headers[x-user]", "request.auth.claims[groups]", "request.auth.claims[a][b]", "source.ip",
           "remote.ip", "destination.port", "connection.sni", "source.trustDomain", "request.auth.principal",
           "experimental.envoy.filters.a[b]", "destination.labels[app]", "request.headers[", ISSUER, "https://x/jwks",
           "ftp://x", jwks(KEY), "{}", "Bearer ", "x-jwt", "access_token", "\u00e9", "\x00", "a*b*c", "ALLOW"]
WRONG = st.sampled_from([None, "x", 7, [], {}, True])


def mostly(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(*([good] * 9), WRONG)


def value(typ: Any, depth: int) -> st.SearchStrategy[Any]:
    if depth > 6:
        return WRONG
    if isinstance(typ, tuple):
        if typ[0] == "enum":
            return mostly(st.sampled_from(sorted(typ[1]))) | st.sampled_from([0, 3, 99, "NOPE"])
        if typ[0] == "list":
            return mostly(st.lists(value(typ[1], depth + 1), max_size=3))
        if typ[0] == "map":
            return mostly(st.dictionaries(st.sampled_from(["app", "", "a*"]), value(typ[1], depth + 1), max_size=2))
        if typ[0] == "portmap":
            return mostly(st.dictionaries(st.sampled_from([80, 0, "8080", "x", 70000]), value(typ[1], depth + 1),
                                          max_size=2))
    if typ == "string":
        return mostly(st.sampled_from(STRINGS))
    if typ == "bool":
        return st.booleans()
    if typ == "duration":
        return st.sampled_from(["1s", "0s", "abc"])
    if typ in schema.SCALARS:
        return mostly(st.sampled_from([0, 1, -1, math.inf, "x"]))
    fields = schema.MESSAGES[typ]
    chosen = st.lists(st.sampled_from(sorted(fields)), max_size=4, unique=True)
    return mostly(chosen.flatmap(lambda names: st.fixed_dictionaries({n: value(fields[n], depth + 1) for n in names})))


@st.composite
def documents(draw: st.DrawFn) -> str:
    docs = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(sorted(schema.SECURITY_KINDS)))
        docs.append({"apiVersion": draw(st.sampled_from(["security.istio.io/v1", "security.istio.io/v1beta1"])),
                     "kind": kind, "metadata": {"name": "p", "namespace": draw(st.sampled_from(["foo", "istio-system"]))},
                     "spec": draw(value(schema.SECURITY_KINDS[kind], 0))})
    return yaml.safe_dump_all(docs, allow_unicode=True)


HEADERS = [[], [(b"authorization", b"Bearer " + KEY.token().encode())], [(b"authorization", b"Bearer x.y.z")],
           [(b"x-user", b"alice"), (b"x-forwarded-for", b"1.2.3.4")], [(b"authorization", b"Bearer " + KEY.token(
               aud=["a"], groups="admin", exp=1).encode())]]


@FUZZ
@given(text=documents(), headers=st.sampled_from(HEADERS), method=st.sampled_from([b"GET", b"OPTIONS"]),
       path=st.sampled_from([b"/", b"/admin", b"/a/x/b", b"/\xc3\xa9"]))
def test_security_documents_load_compile_and_decide(text: str, headers: list[tuple[bytes, bytes]], method: bytes,
                                                    path: bytes) -> None:
    problems: list[Any] = []
    resources = load_text(text, "fuzz.yaml", problems)
    assert all(p.message for p in problems)
    if any(p.severity == "error" for p in problems):
        return
    policy = compile_workload_policy(snapshot_of(resources), Workload("foo", {"app": "a"}), JwksCache())
    head = RequestHead(method, path, path, b"access_token=abc", b"example.com", list(headers), b"1.1", True, None,
                       False, False, frozenset())
    verdict = policy.bind(8000, True).check(head, b"10.0.0.1", "spiffe://cluster.local/ns/default/sa/sleep",
                                            "10.0.0.9", "example.com")
    assert verdict is None or verdict.status in (0, 401, 403)


# Well-formed policies built from valid values, so that most examples get past the loader into the matchers.
SOURCE_VALUES = {
    "principals": ["*", "cluster.local/ns/default/sa/sleep", "*/sa/sleep", "cluster.local/*"],
    "namespaces": ["default", "*", "prod-*"], "ipBlocks": ["10.0.0.0/8", "10.0.0.1", "::1"],
    "remoteIpBlocks": ["1.2.3.4", "0.0.0.0/0"], "requestPrincipals": ["*", f"{ISSUER}/alice", "*/alice", f"{ISSUER}/*"],
    "trustDomains": ["cluster.local", "*.local", "*"],  # (serviceAccounts may not sit beside principals)
}
OPERATION_VALUES = {
    "hosts": ["example.com", "*.com", "*", "EXAMPLE.com*"], "ports": ["8000", "80"], "methods": ["GET", "*", "PO*"],
    "paths": ["/admin", "/a/{*}/b", "/a/{**}", "*", "/adm*", "*.html"],
}
WHEN_VALUES = {
    "request.headers[x-user]": ["alice", "*", "al*"], "request.auth.claims[groups]": ["admin", "*"],
    "request.auth.claims[a][b]": ["x"], "source.ip": ["10.0.0.0/8"], "remote.ip": ["1.2.3.4"],
    "destination.ip": ["10.0.0.9"], "destination.port": ["8000"], "connection.sni": ["*.com", "*"],
    "source.namespace": ["default"], "source.principal": ["*"], "request.auth.audiences": ["a"],
    "request.auth.presenter": ["*"], "request.auth.principal": ["*"], "source.trustDomain": ["cluster.local"],
}


def _field(values: dict[str, list[str]]) -> st.SearchStrategy[dict[str, list[str]]]:
    def entry(name: str) -> st.SearchStrategy[tuple[str, list[str]]]:
        key = st.sampled_from([name, "not" + name[0].upper() + name[1:]])
        return st.tuples(key, st.lists(st.sampled_from(values[name]), min_size=1, max_size=2))
    return st.lists(st.sampled_from(sorted(values)), min_size=1, max_size=3, unique=True).flatmap(
        lambda names: st.tuples(*(entry(n) for n in names)).map(dict))


def _condition() -> st.SearchStrategy[dict[str, Any]]:
    def of(key: str, which: str) -> st.SearchStrategy[dict[str, Any]]:
        return st.lists(st.sampled_from(WHEN_VALUES[key]), min_size=1, max_size=2).map(
            lambda values: {"key": key, which: values})
    return st.tuples(st.sampled_from(sorted(WHEN_VALUES)), st.sampled_from(["values", "notValues"])).flatmap(
        lambda pair: of(*pair))


RULE = st.fixed_dictionaries({}, optional={
    "from": st.lists(_field(SOURCE_VALUES).map(lambda s: {"source": s}), min_size=1, max_size=2),
    "to": st.lists(_field(OPERATION_VALUES).map(lambda o: {"operation": o}), min_size=1, max_size=2),
    "when": st.lists(_condition(), min_size=1, max_size=2),
})
POLICY = st.fixed_dictionaries({"action": st.sampled_from(["ALLOW", "DENY", "AUDIT"]),
                                "rules": st.lists(RULE, min_size=1, max_size=3)})


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(specs=st.lists(POLICY, min_size=1, max_size=3), headers=st.sampled_from(HEADERS),
       path=st.sampled_from([b"/", b"/admin", b"/a/x/b", b"/a/1/2", b"/x.html"]))
def test_well_formed_policies_always_decide(specs: list[dict[str, Any]], headers: list[tuple[bytes, bytes]],
                                            path: bytes) -> None:
    docs = [{"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
             "metadata": {"name": f"p{i}", "namespace": "foo"}, "spec": spec} for i, spec in enumerate(specs)]
    docs.append({"apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
                 "metadata": {"name": "jwt", "namespace": "foo"},
                 "spec": {"jwtRules": [{"issuer": ISSUER, "jwks": jwks(KEY)}]}})
    problems: list[Any] = []
    resources = load_text(yaml.safe_dump_all(docs), "fuzz.yaml", problems)
    assert [p for p in problems if p.severity == "error"] == []
    policy = compile_workload_policy(snapshot_of(resources), Workload("foo", {}), JwksCache())
    head = RequestHead(b"GET", path, path, b"", b"example.com", list(headers), b"1.1", True, None, False, False,
                       frozenset())
    verdict = policy.bind(8000, True).check(head, b"10.0.0.1", "spiffe://cluster.local/ns/default/sa/sleep",
                                            "10.0.0.9", "example.com")
    denies_everything = any(spec["action"] == "DENY" and {} in spec["rules"] for spec in specs)
    if denies_everything and (verdict is None or verdict.failure is None):
        assert verdict is not None and verdict.status == 403  # a DENY with an empty rule denies every request
