"""AuthorizationPolicy semantics, table-driven: Istio YAML through the real loader -> compiled Authorizer -> decision.

Cases follow Istio's reference (istio.io authorization-policy, the allow-nothing / deny-all examples) and its
generator (pilot/pkg/security/authz/model: string matchers, principals with `spiffe://`, requestPrincipals split at
the last `/`, hosts ignoring case, path templates).
"""

from __future__ import annotations

from typing import Any

import pytest

from meshproxy.istio import model as m
from meshproxy.istio.load import load_text, snapshot_of
from meshproxy.security.authz import NO_AUTHZ, AuthzRequest, compile_authz, path_template_regex
from meshproxy.security.scope import Workload

WORKLOAD = Workload("foo", {"app": "httpbin", "version": "v1"})
SLEEP = "cluster.local/ns/default/sa/sleep"


def policies(text: str) -> list[m.AuthorizationPolicy]:
    problems: list[Any] = []
    resources = load_text(text, "p.yaml", problems)
    assert [p for p in problems if p.severity == "error"] == []
    return list(snapshot_of(resources).authorization_policies)


def policy(spec: str, name: str = "p", namespace: str = "foo", action: str = "") -> str:
    action_line = f"  action: {action}\n" if action else ""
    return (f"---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            f"metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{action_line}{spec}\n")


def request(method: str = "GET", path: str = "/", host: str = "httpbin.foo", headers: dict[str, str] | None = None,
            principal: str = "", source: str = "10.0.0.1", remote: str = "", local: str = "10.0.0.9",
            port: int = 8000, sni: str = "", claims: dict[str, Any] | None = None) -> AuthzRequest:
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    return AuthzRequest(method, path, host, raw, principal, source, remote, local, port, sni, claims)


def decide(text: str, req: AuthzRequest, workload: Workload = WORKLOAD) -> tuple[bool, str]:
    decision = compile_authz(policies(text), workload).check(req)
    return decision.allowed, decision.policy_id


DENY_ADMIN = policy("  rules: [{to: [{operation: {paths: [/admin]}}]}]", "deny-admin", action="DENY")
ALLOW_NOTHING = policy("  {}", "allow-nothing")

CASES = [
    # ---- empty rules and no rules
    ("no policy at all", "", request(), (True, "")),
    ("allow-nothing (spec: {}) denies everything", ALLOW_NOTHING, request(), (False, "none")),
    ("ALLOW with an empty rule allows everything", policy("  rules: [{}]", "allow-all"), request(), (True, "")),
    ("DENY with an empty rule denies everything", policy("  rules: [{}]", "deny-all", action="DENY"), request(),
     (False, "ns[foo]-policy[deny-all]-rule[0]")),
    ("allow-nothing next to an allow-all: allowed", ALLOW_NOTHING + policy("  rules: [{}]", "all"), request(),
     (True, "")),
    # ---- paths
    ("DENY exact path matches it", DENY_ADMIN, request(path="/admin"), (False, "ns[foo]-policy[deny-admin]-rule[0]")),
    ("DENY exact path: another path passes", DENY_ADMIN, request(path="/admin/x"), (True, "")),
    ("DENY exact path: the query is not part of the path", DENY_ADMIN, request(path="/admin"), (False, "ns[foo]-policy[deny-admin]-rule[0]")),
    ("prefix path", policy("  rules: [{to: [{operation: {paths: ['/api/*']}}]}]"), request(path="/api/v1"), (True, "")),
    ("prefix path: other prefix", policy("  rules: [{to: [{operation: {paths: ['/api/*']}}]}]"), request(path="/apix"), (False, "none")),
    ("suffix path", policy("  rules: [{to: [{operation: {paths: ['*.html']}}]}]"), request(path="/a/b.html"), (True, "")),
    ("presence path", policy("  rules: [{to: [{operation: {paths: ['*']}}]}]"), request(path="/"), (True, "")),
    ("template {*}: one segment", policy("  rules: [{to: [{operation: {paths: ['/api/{*}/items']}}]}]"),
     request(path="/api/42/items"), (True, "")),
    ("template {*}: not two segments", policy("  rules: [{to: [{operation: {paths: ['/api/{*}/items']}}]}]"),
     request(path="/api/4/2/items"), (False, "none")),
    ("template {*}: not an empty segment", policy("  rules: [{to: [{operation: {paths: ['/api/{*}/items']}}]}]"),
     request(path="/api//items"), (False, "none")),
    ("template {**}: the rest", policy("  rules: [{to: [{operation: {paths: ['/files/{**}']}}]}]"),
     request(path="/files/a/b/c.txt"), (True, "")),
    ("template {**}: zero segments", policy("  rules: [{to: [{operation: {paths: ['/files/{**}']}}]}]"),
     request(path="/files/"), (True, "")),
    ("template {**}: not another prefix", policy("  rules: [{to: [{operation: {paths: ['/files/{**}']}}]}]"),
     request(path="/filesystem"), (False, "none")),
    ("template {*} then {**} (Istio's example)", policy("  rules: [{to: [{operation: {paths: ['/foo/{*}/bar/{**}']}}]}]"),
     request(path="/foo/buzz/bar/baz"), (True, "")),
    ("notPaths", policy("  rules: [{to: [{operation: {notPaths: ['/private/*']}}]}]"), request(path="/private/x"),
     (False, "none")),
    # ---- methods
    ("methods: GET allowed", policy("  rules: [{to: [{operation: {methods: [GET]}}]}]"), request("GET"), (True, "")),
    ("methods: POST denied", policy("  rules: [{to: [{operation: {methods: [GET]}}]}]"), request("POST"), (False, "none")),
    ("notMethods", policy("  rules: [{to: [{operation: {notMethods: [DELETE]}}]}]", action="DENY"), request("GET"),
     (False, "ns[foo]-policy[p]-rule[0]")),
    # ---- hosts
    ("hosts ignore case", policy("  rules: [{to: [{operation: {hosts: [Example.COM]}}]}]"), request(host="example.com"),
     (True, "")),
    ("hosts: exact host does not match with a port (as Envoy's :authority)",
     policy("  rules: [{to: [{operation: {hosts: [example.com]}}]}]"), request(host="example.com:8080"), (False, "none")),
    ("hosts: prefix covers the port", policy("  rules: [{to: [{operation: {hosts: ['example.com*']}}]}]"),
     request(host="example.com:8080"), (True, "")),
    ("hosts: suffix wildcard", policy("  rules: [{to: [{operation: {hosts: ['*.example.com']}}]}]"),
     request(host="API.example.com"), (True, "")),
    ("notHosts", policy("  rules: [{to: [{operation: {notHosts: [evil.com]}}]}]"), request(host="EVIL.com"),
     (False, "none")),
    # ---- ports
    ("ports", policy("  rules: [{to: [{operation: {ports: ['8000']}}]}]"), request(port=8000), (True, "")),
    ("ports: other port", policy("  rules: [{to: [{operation: {ports: ['8000']}}]}]"), request(port=9000), (False, "none")),
    ("notPorts", policy("  rules: [{to: [{operation: {notPorts: ['8000']}}]}]"), request(port=8000), (False, "none")),
    # ---- principals, namespaces, service accounts
    ("principal exact", policy(f"  rules: [{{from: [{{source: {{principals: ['{SLEEP}']}}}}]}}]"),
     request(principal="spiffe://" + SLEEP), (True, "")),
    ("principal exact, given without spiffe://", policy(f"  rules: [{{from: [{{source: {{principals: ['{SLEEP}']}}}}]}}]"),
     request(principal=SLEEP), (True, "")),
    ("principal: plaintext peer has none", policy(f"  rules: [{{from: [{{source: {{principals: ['{SLEEP}']}}}}]}}]"),
     request(), (False, "none")),
    ("principal *: any authenticated peer", policy("  rules: [{from: [{source: {principals: ['*']}}]}]"),
     request(principal=SLEEP), (True, "")),
    ("principal *: not a plaintext peer", policy("  rules: [{from: [{source: {principals: ['*']}}]}]"), request(),
     (False, "none")),
    ("principal prefix", policy("  rules: [{from: [{source: {principals: ['cluster.local/ns/default/*']}}]}]"),
     request(principal=SLEEP), (True, "")),
    ("principal suffix", policy("  rules: [{from: [{source: {principals: ['*/sa/sleep']}}]}]"),
     request(principal="spiffe://other.td/ns/x/sa/sleep"), (True, "")),
    ("notPrincipals * denies plaintext (require mTLS)",
     policy("  rules: [{from: [{source: {notPrincipals: ['*']}}]}]", "require-mtls", action="DENY"), request(),
     (False, "ns[foo]-policy[require-mtls]-rule[0]")),
    ("notPrincipals * lets an mTLS peer through",
     policy("  rules: [{from: [{source: {notPrincipals: ['*']}}]}]", "require-mtls", action="DENY"),
     request(principal=SLEEP), (True, "")),
    ("namespaces", policy("  rules: [{from: [{source: {namespaces: [default]}}]}]"), request(principal=SLEEP), (True, "")),
    ("namespaces: other namespace", policy("  rules: [{from: [{source: {namespaces: [prod]}}]}]"),
     request(principal=SLEEP), (False, "none")),
    ("namespaces: wildcard", policy("  rules: [{from: [{source: {namespaces: ['def*']}}]}]"), request(principal=SLEEP),
     (True, "")),
    ("notNamespaces", policy("  rules: [{from: [{source: {notNamespaces: [default]}}]}]", action="DENY"),
     request(principal="cluster.local/ns/prod/sa/x"), (False, "ns[foo]-policy[p]-rule[0]")),
    ("serviceAccounts ns/sa", policy("  rules: [{from: [{source: {serviceAccounts: [default/sleep]}}]}]"),
     request(principal=SLEEP), (True, "")),
    ("serviceAccounts: sa alone is the policy's namespace", policy("  rules: [{from: [{source: {serviceAccounts: [sleep]}}]}]"),
     request(principal=SLEEP), (False, "none")),
    ("serviceAccounts: no prefix match", policy("  rules: [{from: [{source: {serviceAccounts: [default/sle]}}]}]"),
     request(principal=SLEEP), (False, "none")),
    ("trustDomains", policy("  rules: [{from: [{source: {trustDomains: [cluster.local]}}]}]"), request(principal=SLEEP),
     (True, "")),
    ("trustDomains: not a longer domain", policy("  rules: [{from: [{source: {trustDomains: [cluster.loc]}}]}]"),
     request(principal=SLEEP), (False, "none")),
    ("trustDomains wildcard", policy("  rules: [{from: [{source: {trustDomains: ['*.local']}}]}]"),
     request(principal=SLEEP), (True, "")),
    ("notTrustDomains *: plaintext", policy("  rules: [{from: [{source: {notTrustDomains: ['*']}}]}]"), request(),
     (True, "")),
    ("when source.trustDomain", policy("  rules: [{when: [{key: source.trustDomain, values: [other.td]}]}]"),
     request(principal=SLEEP), (False, "none")),
    # ---- IPs
    ("ipBlocks CIDR", policy("  rules: [{from: [{source: {ipBlocks: [10.0.0.0/24]}}]}]"), request(source="10.0.0.7"),
     (True, "")),
    ("ipBlocks: outside", policy("  rules: [{from: [{source: {ipBlocks: [10.0.0.0/24]}}]}]"), request(source="10.0.1.7"),
     (False, "none")),
    ("notIpBlocks", policy("  rules: [{from: [{source: {notIpBlocks: [10.0.0.1]}}]}]", action="DENY"),
     request(source="10.0.0.2"), (False, "ns[foo]-policy[p]-rule[0]")),
    ("remoteIpBlocks use the remote address", policy("  rules: [{from: [{source: {remoteIpBlocks: [1.2.3.4]}}]}]"),
     request(source="10.0.0.1", remote="1.2.3.4"), (True, "")),
    ("remoteIpBlocks: not the direct peer", policy("  rules: [{from: [{source: {remoteIpBlocks: [10.0.0.1]}}]}]"),
     request(source="10.0.0.1", remote="1.2.3.4"), (False, "none")),
    ("remoteIpBlocks: an XFF entry that is not an IP falls back to the peer",
     policy("  rules: [{from: [{source: {remoteIpBlocks: [10.0.0.1]}}]}]"), request(source="10.0.0.1", remote="junk"),
     (True, "")),
    ("IPv6 block", policy("  rules: [{from: [{source: {ipBlocks: ['::1/128']}}]}]"), request(source="::1"), (True, "")),
    # ---- request principals (JWT)
    ("requestPrincipals *: needs a token", policy("  rules: [{from: [{source: {requestPrincipals: ['*']}}]}]"),
     request(), (False, "none")),
    ("requestPrincipals *: with a token", policy("  rules: [{from: [{source: {requestPrincipals: ['*']}}]}]"),
     request(claims={"iss": "https://issuer", "sub": "alice"}), (True, "")),
    ("requestPrincipals exact, issuer with slashes",
     policy("  rules: [{from: [{source: {requestPrincipals: ['https://a.example/tenant/alice']}}]}]"),
     request(claims={"iss": "https://a.example/tenant", "sub": "alice"}), (True, "")),
    ("requestPrincipals: issuer/* is any subject of that issuer",
     policy("  rules: [{from: [{source: {requestPrincipals: ['https://a.example/*']}}]}]"),
     request(claims={"iss": "https://a.example", "sub": "bob"}), (True, "")),
    ("requestPrincipals: */sub", policy("  rules: [{from: [{source: {requestPrincipals: ['*/alice']}}]}]"),
     request(claims={"iss": "x", "sub": "alice"}), (True, "")),
    ("notRequestPrincipals *: DENY requests without a token",
     policy("  rules: [{from: [{source: {notRequestPrincipals: ['*']}}]}]", action="DENY"), request(),
     (False, "ns[foo]-policy[p]-rule[0]")),
    # ---- when
    ("when header exact", policy("  rules: [{when: [{key: 'request.headers[X-User]', values: [alice]}]}]"),
     request(headers={"x-user": "alice"}), (True, "")),
    ("when header: absent", policy("  rules: [{when: [{key: 'request.headers[X-User]', values: [alice]}]}]"),
     request(), (False, "none")),
    ("when header presence *", policy("  rules: [{when: [{key: 'request.headers[x-token]', values: ['*']}]}]"),
     request(headers={"x-token": ""}), (True, "")),
    ("when header notValues", policy("  rules: [{when: [{key: 'request.headers[x-user]', notValues: [eve]}]}]"),
     request(headers={"x-user": "eve"}), (False, "none")),
    ("when header prefix", policy("  rules: [{when: [{key: 'request.headers[user-agent]', values: ['curl/*']}]}]"),
     request(headers={"user-agent": "curl/8.1"}), (True, "")),
    ("when claim in a list", policy("  rules: [{when: [{key: 'request.auth.claims[groups]', values: [admin]}]}]"),
     request(claims={"iss": "i", "sub": "s", "groups": ["dev", "admin"]}), (True, "")),
    ("when claim not in the list", policy("  rules: [{when: [{key: 'request.auth.claims[groups]', values: [admin]}]}]"),
     request(claims={"iss": "i", "sub": "s", "groups": ["dev"]}), (False, "none")),
    ("when nested claim", policy("  rules: [{when: [{key: 'request.auth.claims[realm][role]', values: [ops]}]}]"),
     request(claims={"realm": {"role": "ops"}}), (True, "")),
    ("when claim without a token", policy("  rules: [{when: [{key: 'request.auth.claims[iss]', values: ['*']}]}]"),
     request(), (False, "none")),
    ("when audiences", policy("  rules: [{when: [{key: request.auth.audiences, values: [bookstore]}]}]"),
     request(claims={"aud": ["bookstore", "x"]}), (True, "")),
    ("when presenter", policy("  rules: [{when: [{key: request.auth.presenter, values: ['web-*']}]}]"),
     request(claims={"azp": "web-app"}), (True, "")),
    ("when request.auth.principal", policy("  rules: [{when: [{key: request.auth.principal, values: [iss/sub]}]}]"),
     request(claims={"iss": "iss", "sub": "sub"}), (True, "")),
    ("when source.ip", policy("  rules: [{when: [{key: source.ip, values: [10.0.0.0/8]}]}]"), request(), (True, "")),
    ("when remote.ip notValues", policy("  rules: [{when: [{key: remote.ip, notValues: [1.2.3.4]}]}]"),
     request(remote="1.2.3.4"), (False, "none")),
    ("when destination.ip", policy("  rules: [{when: [{key: destination.ip, values: [10.0.0.9]}]}]"), request(), (True, "")),
    ("when destination.port", policy("  rules: [{when: [{key: destination.port, values: ['8000']}]}]"), request(),
     (True, "")),
    ("when source.namespace", policy("  rules: [{when: [{key: source.namespace, values: [default]}]}]"),
     request(principal=SLEEP), (True, "")),
    ("when source.principal", policy(f"  rules: [{{when: [{{key: source.principal, values: ['{SLEEP}']}}]}}]"),
     request(principal=SLEEP), (True, "")),
    ("when connection.sni: plaintext has none", policy("  rules: [{when: [{key: connection.sni, values: ['*']}]}]"),
     request(), (False, "none")),
    ("when connection.sni", policy("  rules: [{when: [{key: connection.sni, values: ['*.foo.svc']}]}]"),
     request(sni="httpbin.foo.svc"), (True, "")),
    # ---- combining
    ("from entries OR", policy("  rules: [{from: [{source: {namespaces: [prod]}}, {source: {ipBlocks: [10.0.0.1]}}]}]"),
     request(principal=SLEEP), (True, "")),
    ("source fields AND", policy("  rules: [{from: [{source: {namespaces: [default], ipBlocks: [9.9.9.9]}}]}]"),
     request(principal=SLEEP), (False, "none")),
    ("from AND to AND when", policy("  rules: [{from: [{source: {principals: ['*']}}], to: [{operation: {methods: [GET]}}],"
                                    " when: [{key: 'request.headers[x]', values: ['1']}]}]"),
     request(principal=SLEEP, headers={"x": "2"}), (False, "none")),
    ("rules OR", policy("  rules: [{to: [{operation: {paths: [/a]}}]}, {to: [{operation: {paths: [/b]}}]}]"),
     request(path="/b"), (True, "")),
    ("DENY is evaluated before ALLOW", policy("  rules: [{}]", "allow-all") + DENY_ADMIN, request(path="/admin"),
     (False, "ns[foo]-policy[deny-admin]-rule[0]")),
    ("the DENY rule index is named", policy("  rules: [{to: [{operation: {paths: [/a]}}]}, {to: [{operation: {paths: [/b]}}]}]",
                                            "d", action="DENY"), request(path="/b"), (False, "ns[foo]-policy[d]-rule[1]")),
    ("AUDIT never decides", policy("  rules: [{}]", "audit", action="AUDIT"), request(), (True, "")),
    # ---- scope
    ("a selector that does not match: no policy", policy("  selector: {matchLabels: {app: other}}\n  rules: [{}]",
                                                         action="DENY"), request(), (True, "")),
    ("a selector that matches", policy("  selector: {matchLabels: {app: httpbin}}\n  rules: [{}]", action="DENY"),
     request(), (False, "ns[foo]-policy[p]-rule[0]")),
    ("another namespace's policy does not apply", policy("  rules: [{}]", namespace="bar", action="DENY"), request(),
     (True, "")),
    ("the root namespace istio-system is mesh-wide", policy("  {}", "mesh-nothing", namespace="istio-system"), request(),
     (False, "none")),
    ("a root-namespace policy with a selector selects only root-namespace workloads",
     policy("  selector: {matchLabels: {app: httpbin}}\n  rules: [{}]", namespace="istio-system", action="DENY"),
     request(), (True, "")),
]


@pytest.mark.parametrize(("text", "req", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decision(text: str, req: AuthzRequest, expected: tuple[bool, str]) -> None:
    assert decide(text, req) == expected


def test_no_applicable_policy_compiles_to_the_shared_no_authz():
    assert compile_authz([], WORKLOAD) is NO_AUTHZ
    assert compile_authz(policies(policy("  rules: [{}]", namespace="bar")), WORKLOAD) is NO_AUTHZ


def test_audit_marks_the_matching_rule():
    authz = compile_authz(policies(policy("  rules: [{to: [{operation: {methods: [POST]}}]}]", "audit-posts",
                                          action="AUDIT")), WORKLOAD)
    assert authz.audited(request("POST")) == "ns[foo]-policy[audit-posts]-rule[0]"
    assert authz.audited(request("GET")) == ""


def test_gateway_target_ref_selects_the_gateway_pods_only():
    text = policy("  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: edge}]\n  rules: [{}]",
                  action="DENY")
    gateway = Workload("foo", {"gateway.networking.k8s.io/gateway-name": "edge"})
    assert decide(text, request(), gateway)[0] is False
    assert decide(text, request(), WORKLOAD)[0] is True


@pytest.mark.parametrize(("template", "path", "matches"), [
    ("/foo/{*}", "/foo/bar", True),
    ("/foo/{*}", "/foo/bar/baz", False),
    ("/foo/{**}/", "/foo/bar/", True),
    ("/foo/{**}/", "/foo//", True),
    ("/foo/{**}/", "/foo/bar", False),
    ("/foo/{*}/bar/{**}", "/foo/buzz/bar/", True),
    ("/{**}/path/template", "/a/b/path/template", True),
    ("/a.b/{*}", "/aXb/c", False),  # literals are literal, not regex
])
def test_path_template_as_envoy_uri_template(template: str, path: str, matches: bool):
    import re

    assert (re.fullmatch(path_template_regex(template), path) is not None) is matches


def test_a_waypoint_target_ref_is_reported_and_never_applies():
    text = policy("  targetRefs: [{kind: Service, name: httpbin}]\n  rules: [{}]", action="DENY")
    problems: list[Any] = []
    snapshot = snapshot_of(load_text(text, "p.yaml", problems))
    assert [(p.severity, p.path) for p in problems] == [("warning", "spec.targetRefs[0].kind")]
    assert "waypoint" in problems[0].message
    assert compile_authz(snapshot.authorization_policies, WORKLOAD) is NO_AUTHZ


@pytest.mark.parametrize(("spec", "path", "message"), [
    ("  action: DENY", "spec.rules", "DENY action without `rules` is meaningless"),
    ("  action: CUSTOM\n  provider: {name: opa}\n  rules: [{}]", "spec.action", "CUSTOM authorization"),
    ("  provider: {name: opa}\n  rules: [{}]", "spec.provider", "`provider` must not be with non CUSTOM action"),
    ("  action: REJECT", "spec.action", "'REJECT' is not one of"),
    ("  rules: [{from: [{source: {}}]}]", "spec.rules[0].from[0].source", "`from.source` must not be empty"),
    ("  rules: [{from: [{}]}]", "spec.rules[0].from[0].source", "`from.source` must not be nil"),
    ("  rules: [{to: [{operation: {}}]}]", "spec.rules[0].to[0].operation", "`to.operation` must not be empty"),
    ("  rules: [{to: [{operation: {paths: ['']}}]}]", "spec.rules[0].to[0].operation.paths[0]", "empty value"),
    ("  rules: [{to: [{operation: {ports: [http]}}]}]", "spec.rules[0].to[0].operation.ports[0]", "bad port"),
    ("  rules: [{to: [{operation: {paths: ['/a/{**}/b/{*}']}}]}]", "spec.rules[0].to[0].operation.paths[0]",
     "{**} is not the last operator"),
    ("  rules: [{to: [{operation: {paths: ['/a/{*}.txt']}}]}]", "spec.rules[0].to[0].operation.paths[0]",
     "beyond a supported path template"),
    ("  rules: [{from: [{source: {ipBlocks: [10.0.0.300]}}]}]", "spec.rules[0].from[0].source.ipBlocks[0]",
     "bad IP address"),
    ("  rules: [{from: [{source: {remoteIpBlocks: [10.0.0.0/33]}}]}]",
     "spec.rules[0].from[0].source.remoteIpBlocks[0]", "bad CIDR range"),
    ("  rules: [{when: [{key: request.auth.claims, values: [x]}]}]", "spec.rules[0].when[0].key", "unknown attribute"),
    ("  rules: [{when: [{key: 'experimental.envoy.filters.a.b[c]', values: [x]}]}]", "spec.rules[0].when[0].key",
     "experimental"),
    ("  rules: [{when: [{key: 'destination.labels[app]', values: [x]}]}]", "spec.rules[0].when[0].key",
     "replaced by the workload selector"),
    ("  rules: [{when: [{key: source.ip}]}]", "spec.rules[0].when[0]", "at least one of `values` or `notValues`"),
    ("  rules: [{when: [{key: destination.port, values: ['99999']}]}]", "spec.rules[0].when[0].values[0]", "bad port"),
    ("  rules: [{from: [{source: {principalz: [a]}}]}]", "spec.rules[0].from[0].source.principalz", "unknown field"),
    ("  selector: {matchLabels: {app: h}}\n  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: g}]",
     "spec", "only one of targetRefs or workloadSelector"),
])
def test_invalid_policies_are_refused_naming_file_document_and_field(spec: str, path: str, message: str):
    problems: list[Any] = []
    load_text("---\napiVersion: v1\nkind: Service\nmetadata: {name: s}\n" + policy(spec), "p.yaml", problems)
    errors = [p for p in problems if p.severity == "error"]
    assert [(p.file, p.doc, p.path) for p in errors] == [("p.yaml", 1, path)]
    assert message in errors[0].message


def test_dry_run_policies_are_decided_aside_and_never_enforced():
    text = policy("  rules: [{}]", "would-deny", action="DENY").replace(
        "metadata: {name: would-deny, namespace: foo}",
        "metadata: {name: would-deny, namespace: foo, annotations: {istio.io/dry-run: 'true'}}")
    authz = compile_authz(policies(text), WORKLOAD)
    assert authz is not NO_AUTHZ and authz.check(request()).allowed
    assert authz.dry_run is not None
    assert authz.dry_run.check(request()).policy_id == "ns[foo]-policy[would-deny]-rule[0]"


def test_pseudo_header_names_in_when_keys():
    text = policy("  rules: [{when: [{key: 'request.headers[:authority]', values: ['*.foo']}]}]")
    assert decide(text, request(host="httpbin.foo")) == (True, "")
    assert decide(text, request(host="httpbin.bar")) == (False, "none")


# ---- plain TCP connections: istiod's TCP filter chain (builder testdata action-{allow,deny}-HTTP-for-TCP-filter)

def connection(principal: str = "", source: str = "10.0.0.1", port: int = 8000, sni: str = "") -> AuthzRequest:
    return AuthzRequest("", "", "", [], principal, source, "", "10.0.0.9", port, sni, None)


def decide_tcp(text: str, req: AuthzRequest) -> tuple[bool, str]:
    decision = compile_authz(policies(text), WORKLOAD, for_tcp=True).check(req)
    return decision.allowed, decision.policy_id


NS1 = "cluster.local/ns/ns-1/sa/client"
DENY_MIXED = policy("""  rules:
  - from: [{source: {requestPrincipals: [id-1]}}]
    to: [{operation: {methods: [GET]}}]
  - from: [{source: {namespaces: [ns-1]}}]
    to: [{operation: {methods: [GET]}}]
  - to: [{operation: {ports: ["80"]}}]
    from: [{source: {requestPrincipals: [id-1]}}]""", "httpbin-deny", action="DENY")

TCP_CASES = [
    ("DENY: a rule of HTTP-only fields alone denies every connection", DENY_MIXED, connection(),
     (False, "ns[foo]-policy[httpbin-deny]-rule[0]")),
    ("DENY: without the HTTP-only ones, the namespace still constrains", policy(
        "  rules: [{from: [{source: {namespaces: [ns-1]}}], to: [{operation: {methods: [GET]}}]}]", "d",
        action="DENY"), connection(SLEEP), (True, "")),
    ("DENY: ... and denies the namespace's peers", policy(
        "  rules: [{from: [{source: {namespaces: [ns-1]}}], to: [{operation: {methods: [GET]}}]}]", "d",
        action="DENY"), connection(NS1), (False, "ns[foo]-policy[d]-rule[0]")),
    ("DENY: ports stay after requestPrincipals go", policy(
        "  rules: [{from: [{source: {requestPrincipals: [id-1]}}], to: [{operation: {ports: ['80']}}]}]", "d",
        action="DENY"), connection(port=8000), (True, "")),
    ("DENY: a request header condition is dropped: denies all", policy(
        "  rules: [{when: [{key: 'request.headers[x-deny]', values: ['yes']}]}]", "d", action="DENY"),
     connection(), (False, "ns[foo]-policy[d]-rule[0]")),
    ("DENY: notMethods dropped too", policy("  rules: [{to: [{operation: {notMethods: [GET]}}]}]", "d",
                                            action="DENY"), connection(), (False, "ns[foo]-policy[d]-rule[0]")),
    ("ALLOW: a rule with an HTTP-only field allows no connection", policy(
        "  rules: [{to: [{operation: {methods: [GET]}}]}]", "a"), connection(SLEEP), (False, "none")),
    ("ALLOW: JWT claims are HTTP only", policy(
        "  rules: [{when: [{key: 'request.auth.claims[iss]', values: [x]}]}]", "a"), connection(), (False, "none")),
    ("ALLOW: the other rules of the policy still allow", policy(
        "  rules:\n  - to: [{operation: {methods: [GET]}}]\n  - from: [{source: {principals: ['" + SLEEP + "']}}]",
        "a"), connection(SLEEP), (True, "")),
    ("ALLOW: ... whom they name only", policy(
        "  rules:\n  - to: [{operation: {methods: [GET]}}]\n  - from: [{source: {principals: ['" + SLEEP + "']}}]",
        "a"), connection(NS1), (False, "none")),
    ("ALLOW: ports, principals, source.ip and connection.sni are TCP fields", policy(
        "  rules: [{to: [{operation: {ports: ['8000']}}], from: [{source: {principals: ['" + SLEEP + "']}}], "
        "when: [{key: source.ip, values: [10.0.0.0/8]}, {key: connection.sni, values: ['*.local']}]}]", "a"),
     connection(SLEEP, sni="db.local"), (True, "")),
    ("ALLOW: ... each of them constrains", policy(
        "  rules: [{to: [{operation: {ports: ['8000']}}], from: [{source: {principals: ['" + SLEEP + "']}}], "
        "when: [{key: source.ip, values: [10.0.0.0/8]}, {key: connection.sni, values: ['*.local']}]}]", "a"),
     connection(SLEEP, sni="db.example"), (False, "none")),
    ("a plaintext peer has no principal", policy("  rules: [{from: [{source: {principals: ['*']}}]}]", "a"),
     connection(""), (False, "none")),
]


@pytest.mark.parametrize(("text", "req", "expected"), [c[1:] for c in TCP_CASES], ids=[c[0] for c in TCP_CASES])
def test_tcp_decision(text: str, req: AuthzRequest, expected: tuple[bool, str]) -> None:
    assert decide_tcp(text, req) == expected


def test_the_http_authorizer_keeps_the_http_fields():
    text = policy("  rules: [{to: [{operation: {methods: [GET]}}]}]", "a")
    assert decide(text, request("GET")) == (True, "")
    assert decide(text, request("POST")) == (False, "none")


def test_audit_for_tcp_marks_what_is_left_of_the_rule():
    authz = compile_authz(policies(policy("  rules: [{to: [{operation: {methods: [POST]}}]}]", "audit-posts",
                                          action="AUDIT")), WORKLOAD, for_tcp=True)
    assert authz.audited(connection()) == "ns[foo]-policy[audit-posts]-rule[0]"
    assert authz.check(connection()).allowed


def test_the_workload_policy_carries_a_tcp_authorizer_and_check_connection_decides_with_it(caplog):
    import logging

    from meshproxy.security.jwt_authn import JwksCache
    from meshproxy.security.policy import check_connection, compile_workload_policy

    text = policy("  rules: [{to: [{operation: {ports: ['5432'], methods: [GET]}}]}]", "deny-db", action="DENY") + \
        policy("  rules: [{}]", "audit-all", action="AUDIT") + \
        policy("  rules: [{from: [{source: {principals: ['" + SLEEP + "']}}]}]", "only-sleep").replace(
            "metadata: {name: only-sleep, namespace: foo}",
            "metadata: {name: only-sleep, namespace: foo, annotations: {istio.io/dry-run: 'true'}}")
    problems: list[Any] = []
    snapshot = snapshot_of(load_text(text, "p.yaml", problems))
    workload_policy = compile_workload_policy(snapshot, WORKLOAD, JwksCache())
    tcp = workload_policy.tcp
    assert tcp is not None and workload_policy.authz is not None and tcp is not workload_policy.authz
    with caplog.at_level(logging.INFO, logger="meshproxy.authz"):
        denied = check_connection(tcp, 5432, "10.0.0.1", SLEEP, "10.0.0.9")
        allowed = check_connection(tcp, 6379, "10.0.0.1", "", "10.0.0.9")
    assert (denied.allowed, denied.policy_id) == (False, "ns[foo]-policy[deny-db]-rule[0]")
    assert allowed.allowed  # the dry-run ALLOW would refuse a plaintext peer: logged, not enforced
    logged = caplog.text
    assert "audit: TCP connection from 10.0.0.1 to port 5432 matched ns[foo]-policy[audit-all]-rule[0]" in logged
    assert "dry-run: TCP connection from 10.0.0.1 to port 6379 would be denied by none" in logged
    assert compile_workload_policy(snapshot_of(load_text(policy("  rules: [{}]", namespace="bar"), "q.yaml", [])),
                                   WORKLOAD, JwksCache()).tcp is None
