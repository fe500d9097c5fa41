"""PeerAuthentication resolution, table-driven: mesh -> namespace -> workload selector -> port level, UNSET inherits."""

from __future__ import annotations

from typing import Any

import pytest

from meshproxy.istio.load import load_text, snapshot_of
from meshproxy.security.peer_authn import DEFAULT_PEER_AUTHN, resolve_peer_authn
from meshproxy.security.scope import Workload

WORKLOAD = Workload("foo", {"app": "httpbin"})


def pa(spec: str, name: str = "p", namespace: str = "foo") -> str:
    return (f"---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
            f"metadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n")


MESH_STRICT = pa("{mtls: {mode: STRICT}}", "default", "istio-system")
NS_PERMISSIVE = pa("{mtls: {mode: PERMISSIVE}}", "default")
NS_DISABLE = pa("{mtls: {mode: DISABLE}}", "default")
NS_UNSET = pa("{mtls: {mode: UNSET}}", "default")

CASES = [
    ("nothing: PERMISSIVE (Istio's default)", "", {8080: "PERMISSIVE"}),
    ("mesh-wide STRICT", MESH_STRICT, {8080: "STRICT"}),
    ("namespace overrides mesh", MESH_STRICT + NS_DISABLE, {8080: "DISABLE"}),
    ("namespace UNSET inherits mesh", MESH_STRICT + NS_UNSET, {8080: "STRICT"}),
    ("a policy without mtls is UNSET", MESH_STRICT + pa("{}", "default"), {8080: "STRICT"}),
    ("another namespace does not apply", pa("{mtls: {mode: DISABLE}}", "x", "bar"), {8080: "PERMISSIVE"}),
    ("workload selector overrides namespace",
     NS_PERMISSIVE + pa("{selector: {matchLabels: {app: httpbin}}, mtls: {mode: STRICT}}", "w"), {8080: "STRICT"}),
    ("workload selector for other labels does not apply",
     NS_DISABLE + pa("{selector: {matchLabels: {app: other}}, mtls: {mode: STRICT}}", "w"), {8080: "DISABLE"}),
    ("port level on top of the workload mode",
     MESH_STRICT + pa("{selector: {matchLabels: {app: httpbin}}, portLevelMtls: {8080: {mode: DISABLE}}}", "w"),
     {8080: "DISABLE", 9090: "STRICT"}),
    ("port level UNSET inherits the resolved mode",
     NS_DISABLE + pa("{selector: {matchLabels: {app: httpbin}}, mtls: {mode: STRICT}, "
                     "portLevelMtls: {'8080': {mode: UNSET}, 9000: {mode: PERMISSIVE}}}", "w"),
     {8080: "STRICT", 9000: "PERMISSIVE", 1: "STRICT"}),
    ("the first workload policy read wins (Istio: the oldest)",
     pa("{selector: {matchLabels: {app: httpbin}}, mtls: {mode: STRICT}}", "a")
     + pa("{selector: {matchLabels: {app: httpbin}}, mtls: {mode: DISABLE}}", "b"), {8080: "STRICT"}),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_mode_for_port(text: str, expected: dict[int, str]):
    problems: list[Any] = []
    snapshot = snapshot_of(load_text(text, "p.yaml", problems))
    assert [p for p in problems if p.severity == "error"] == []
    policy = resolve_peer_authn(snapshot.peer_authentications, WORKLOAD)
    assert {port: policy.mode_for_port(port) for port in expected} == expected


def test_default_is_permissive_everywhere():
    assert DEFAULT_PEER_AUTHN.mode_for_port(15006) == "PERMISSIVE"


@pytest.mark.parametrize(("spec", "path", "message"), [
    ("{portLevelMtls: {8080: {mode: STRICT}}}", "spec.portLevelMtls", "mesh/namespace peer authentication cannot have port level mTLS"),
    ("{selector: {matchLabels: {app: a}}, portLevelMtls: {0: {mode: STRICT}}}", "spec.portLevelMtls.0", "port must be in range 1..65535"),
    ("{mtls: {mode: STRICTER}}", "spec.mtls.mode", "'STRICTER' is not one of"),
    ("{selector: {matchLabels: {app: 'a*'}}}", "spec.selector.matchLabels.app", "wildcard is not supported"),
    ("{mtls: {mod: STRICT}}", "spec.mtls.mod", "unknown field 'mod'"),
])
def test_invalid_peer_authentication_names_the_field(spec: str, path: str, message: str):
    problems: list[Any] = []
    load_text(pa(spec), "p.yaml", problems)
    errors = [p for p in problems if p.severity == "error"]
    assert [(p.file, p.doc, p.path) for p in errors] == [("p.yaml", 0, path)]
    assert message in errors[0].message


def test_the_loaded_config_carries_the_resolved_modes_for_the_transport():
    from meshproxy.security.jwt_authn import JwksCache
    from meshproxy.security.policy import NO_POLICY, NO_WORKLOAD_POLICY, compile_workload_policy

    problems: list[Any] = []
    snapshot = snapshot_of(load_text(MESH_STRICT + pa("{selector: {matchLabels: {app: httpbin}}, "
                                                      "portLevelMtls: {9000: {mode: DISABLE}}}", "w"), "p.yaml", problems))
    policy = compile_workload_policy(snapshot, WORKLOAD, JwksCache())
    assert (policy.peer.mode_for_port(8080), policy.peer.mode_for_port(9000)) == ("STRICT", "DISABLE")
    assert policy.empty  # no per-request check: mTLS is decided per connection
    assert policy.bind(8080, True) is NO_POLICY  # listeners pay nothing per request
    assert compile_workload_policy(snapshot_of([]), WORKLOAD, JwksCache()) is NO_WORKLOAD_POLICY


@pytest.mark.parametrize(("text", "paths"), [
    ("", []),
    (MESH_STRICT, [("p.yaml", 0, "spec.mtls.mode")]),
    (MESH_STRICT + NS_PERMISSIVE, []),  # overridden: plaintext is what PERMISSIVE accepts
    (MESH_STRICT + NS_UNSET, [("p.yaml", 0, "spec.mtls.mode")]),  # inherited
    (NS_DISABLE + pa("{selector: {matchLabels: {app: httpbin}}, portLevelMtls: {8080: {mode: STRICT}}}", "w"),
     [("p.yaml", 1, "spec.portLevelMtls.8080.mode")]),
    (pa("{selector: {matchLabels: {app: other}}, mtls: {mode: STRICT}}", "w"), []),  # another workload's
])
def test_strict_cannot_be_honoured_without_tls_and_is_refused_at_its_field(text: str, paths: list[tuple[str, int, str]]):
    from meshproxy.security.peer_authn import strict_without_tls

    problems: list[Any] = []
    snapshot = snapshot_of(load_text(text, "p.yaml", problems))
    found = strict_without_tls(snapshot.peer_authentications, WORKLOAD)
    assert [(p.file, p.doc, p.path) for p in found] == paths
    assert all("STRICT mutual TLS is not enforced" in p.message for p in found)
