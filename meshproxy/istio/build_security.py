"""The value pass for security.istio.io: AuthorizationPolicy, PeerAuthentication, RequestAuthentication -> model.

What Istio's validation webhook rejects (pkg/config/validation: ValidateAuthorizationPolicy,
ValidatePeerAuthentication, ValidateRequestAuthentication; pkg/config/security: attributes, IPs, ports, path
templates) is an error here, at its field path. What meshproxy cannot enforce is an error too (`action: CUSTOM`),
never a silent skip: a policy that is not enforced protects nothing.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from . import model as m
from .problems import DocProblems
from .values import header_key, is_header_name, parse_duration

ACTIONS = ("ALLOW", "DENY", "AUDIT", "CUSTOM")  # proto enum order (the schema pass accepts the numbers too)
MTLS_MODES = ("UNSET", "DISABLE", "PERMISSIVE", "STRICT")

# Istio pkg/config/security: the `when` keys it accepts, and what it says of the ones it does not.
EXACT_KEYS = frozenset({
    "source.ip", "remote.ip", "source.namespace", "source.principal", "source.serviceAccount", "source.trustDomain",
    "request.auth.principal", "request.auth.audiences", "request.auth.presenter",
    "destination.ip", "destination.port", "connection.sni",
})
MAP_KEYS = ("request.headers", "request.auth.claims")
EXPERIMENTAL_PREFIX = "experimental.envoy.filters."
OLD_KEYS = {
    "destination.namespace": "is replaced by the metadata.namespace",
    "destination.labels": "is replaced by the workload selector",
    "destination.name": "is a deprecated attribute: only supported in v1alpha1",
    "destination.user": "is a deprecated attribute: only supported in v1alpha1",
}
IP_KEYS = frozenset({"source.ip", "remote.ip", "destination.ip"})
NAMED_KEY_RE = re.compile(r"[^\[\]]+(\[[^\[\]]+\])+")

# Path templates (Istio 1.19+): a segment is `{*}`, `{**}` or a literal of RFC 3986 pchars.
MATCH_ONE, MATCH_ANY = "{*}", "{**}"
PATH_LITERAL_RE = re.compile(r"[a-zA-Z0-9\-._~%!$&'()+,;:@=]+")

GATEWAY_GROUP = "gateway.networking.k8s.io"
# Kinds a targetRef may name (Istio's allowedTargetRefs): canonical group, kind.
TARGET_KINDS = {("core", "Service"), ("networking.istio.io", "ServiceEntry"), (GATEWAY_GROUP, "Gateway"),
                (GATEWAY_GROUP, "GatewayClass")}


def _enum_name(value: Any, names: tuple[str, ...]) -> str:
    return names[value] if isinstance(value, int) else str(value)


def _strings(spec: Mapping[str, Any], key: str) -> tuple[str, ...]:
    return tuple(spec.get(key) or ())


def _no_empty(doc: DocProblems, spec: Mapping[str, Any], key: str, path: str) -> tuple[str, ...]:
    values = _strings(spec, key)
    for i, value in enumerate(values):
        if value == "":
            doc.error(f"{path}.{key}[{i}]", "empty value not allowed")
    return values


def _ips(doc: DocProblems, values: Sequence[str], path: str) -> None:
    for i, value in enumerate(values):
        try:
            if "/" in value:
                ipaddress.ip_network(value, strict=False)
            else:
                ipaddress.ip_address(value)
        except ValueError:
            doc.error(f"{path}[{i}]", f"bad {'CIDR range' if '/' in value else 'IP address'} ({value})")


def _ports(doc: DocProblems, values: Sequence[str], path: str) -> None:
    for i, value in enumerate(values):
        if not value.isdigit() or int(value) > 65535:
            doc.error(f"{path}[{i}]", f"bad port ({value}): a number from 0 to 65535")


def contains_path_template(path: str) -> bool:
    return MATCH_ONE in path or MATCH_ANY in path


def path_template_problem(path: str) -> str | None:
    """Istio's CheckValidPathTemplate: None when `path` is a valid path (template or not)."""
    templated = contains_path_template(path)
    seen_any = False
    for glob in path.strip("/").split("/"):
        if glob in (MATCH_ONE, MATCH_ANY):
            if seen_any:
                return "{**} is not the last operator"
            seen_any = glob == MATCH_ANY
            continue
        if "{" in glob or "}" in glob:
            return "contains '{' or '}' beyond a supported path template ({*} or {**} as a whole segment)"
        if templated and not PATH_LITERAL_RE.fullmatch(glob):
            return f"contains segment {glob!r} with invalid string literal"
    return None


def _selector(doc: DocProblems, spec: Mapping[str, Any], path: str) -> Mapping[str, str] | None:
    selector = spec.get("selector")
    if selector is None:
        return None
    labels = dict(selector.get("matchLabels") or {})
    for key, value in labels.items():
        if key == "":
            doc.error(f"{path}.matchLabels", f"empty key is not supported in selector: {key}={value}")
        if "*" in key or "*" in value:
            doc.error(f"{path}.matchLabels.{key}", f"wildcard is not supported in selector: {key}={value}")
    if not labels:
        doc.warn(path, "workload selector specified without labels: it selects every workload of the namespace")
    return labels


def _scope(doc: DocProblems, spec: Mapping[str, Any]) -> m.WorkloadScope:
    present = [k for k in ("selector", "targetRef", "targetRefs") if spec.get(k)]
    if len(present) > 1:
        doc.error("spec", "only one of targetRefs or workloadSelector can be set")
    refs = []
    raw_refs = [("spec.targetRef", spec["targetRef"])] if spec.get("targetRef") else []
    raw_refs += [(f"spec.targetRefs[{i}]", r) for i, r in enumerate(spec.get("targetRefs") or ())]
    for path, ref in raw_refs:
        group, kind, name = ref.get("group", ""), ref.get("kind", ""), ref.get("name", "")
        if not name:
            doc.error(f"{path}.name", "targetRef name must be set")
        if ref.get("namespace"):
            doc.error(f"{path}.namespace", "targetRef namespace must not be set; cross namespace referencing is "
                                           "not supported")
        if (group or "core", kind) not in TARGET_KINDS:
            doc.error(f"{path}.kind", f"targetRef must be to a Service, ServiceEntry, Gateway or GatewayClass, "
                                      f"got {group}/{kind}")
        elif (group, kind) != (GATEWAY_GROUP, "Gateway"):
            doc.warn(f"{path}.kind", f"a targetRef to a {kind} applies to waypoint proxies (ambient mode) only: no "
                                     "sidecar or gateway enforces it, meshproxy neither")
        refs.append(m.PolicyTargetReference(group, kind, name))
    return m.WorkloadScope(_selector(doc, spec, "spec.selector"), tuple(refs))


# ---------------------------------------------------------------------------------------------- AuthorizationPolicy


def _source(doc: DocProblems, spec: Mapping[str, Any], path: str) -> m.Source:
    fields = {key: _no_empty(doc, spec, key, path) for key in (
        "principals", "notPrincipals", "requestPrincipals", "notRequestPrincipals", "namespaces", "notNamespaces",
        "serviceAccounts", "notServiceAccounts", "trustDomains", "notTrustDomains", "ipBlocks", "notIpBlocks",
        "remoteIpBlocks", "notRemoteIpBlocks")}
    if not any(fields.values()):
        doc.error(path, "`from.source` must not be empty")
    for key in ("ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks"):
        _ips(doc, fields[key], f"{path}.{key}")
    for key in ("serviceAccounts", "notServiceAccounts"):
        for i, value in enumerate(fields[key]):
            if "*" in value or value.count("/") > 1 or value.startswith("/") or value.endswith("/"):
                doc.error(f"{path}.{key}[{i}]", f"expected 'serviceAccount' or 'namespace/serviceAccount' without "
                                                f"wildcards, got {value!r}")
    for key in ("trustDomains", "notTrustDomains"):
        for i, value in enumerate(fields[key]):
            if (problem := trust_domain_problem(value)) is not None:
                doc.error(f"{path}.{key}[{i}]", problem)
    if (fields["serviceAccounts"] or fields["notServiceAccounts"]) and any(
            fields[k] for k in ("principals", "notPrincipals", "namespaces", "notNamespaces")):
        doc.error(path, "cannot set serviceAccounts with namespaces or principals")
    return m.Source(
        principals=fields["principals"], not_principals=fields["notPrincipals"],
        request_principals=fields["requestPrincipals"], not_request_principals=fields["notRequestPrincipals"],
        namespaces=fields["namespaces"], not_namespaces=fields["notNamespaces"],
        service_accounts=fields["serviceAccounts"], not_service_accounts=fields["notServiceAccounts"],
        ip_blocks=fields["ipBlocks"], not_ip_blocks=fields["notIpBlocks"],
        remote_ip_blocks=fields["remoteIpBlocks"], not_remote_ip_blocks=fields["notRemoteIpBlocks"],
        trust_domains=fields["trustDomains"], not_trust_domains=fields["notTrustDomains"],
    )


def trust_domain_problem(value: str) -> str | None:
    """Istio's CheckTrustDomainValues: one wildcard at most, at an end; no `/`."""
    stars = value.count("*")
    if stars > 1:
        return f"at most one wildcard is allowed, found {value!r}"
    if stars == 1 and value != "*" and not value.startswith("*") and not value.endswith("*"):
        return f"wildcard is only allowed at the start or end, found {value!r}"
    if "/" in value:
        return f"trust domain must not contain '/', found {value!r}"
    return None


def _operation(doc: DocProblems, spec: Mapping[str, Any], path: str) -> m.Operation:
    fields = {key: _no_empty(doc, spec, key, path) for key in (
        "hosts", "notHosts", "ports", "notPorts", "methods", "notMethods", "paths", "notPaths")}
    if not any(fields.values()):
        doc.error(path, "`to.operation` must not be empty")
    for key in ("ports", "notPorts"):
        _ports(doc, fields[key], f"{path}.{key}")
    for key in ("paths", "notPaths"):
        for i, value in enumerate(fields[key]):
            problem = path_template_problem(value) if value else None
            if problem:
                doc.error(f"{path}.{key}[{i}]", f"invalid or unsupported path {value}: {problem}")
    return m.Operation(
        hosts=fields["hosts"], not_hosts=fields["notHosts"], ports=fields["ports"], not_ports=fields["notPorts"],
        methods=fields["methods"], not_methods=fields["notMethods"], paths=fields["paths"],
        not_paths=fields["notPaths"],
    )


def when_key_problem(key: str) -> str | None:
    """What Istio says of a `when` key (None: accepted); experimental keys read Envoy's internals: refused."""
    if key in EXACT_KEYS:
        return None
    for prefix in MAP_KEYS:
        if key.startswith(prefix + "["):
            return None if NAMED_KEY_RE.fullmatch(key) and (prefix == "request.auth.claims" or key.count("[") == 1) \
                else f"bad key ({key}): should have format {prefix}[name]"
    if key.startswith(EXPERIMENTAL_PREFIX):
        return f"{key}: experimental.envoy.filters.* keys read Envoy's filter metadata, which meshproxy does not have"
    for old, why in OLD_KEYS.items():
        if key == old or key.startswith(old + "["):
            return f"attribute {key} {why}"
    return f"unknown attribute: {key}"


def _condition(doc: DocProblems, spec: Mapping[str, Any], path: str) -> m.Condition:
    key = spec.get("key", "")
    values, not_values = _no_empty(doc, spec, "values", path), _no_empty(doc, spec, "notValues", path)
    if not key:
        doc.error(f"{path}.key", "`key` must not be empty")
    elif not values and not not_values:
        doc.error(path, f"at least one of `values` or `notValues` must be set for key {key}")
    elif (problem := when_key_problem(key)) is not None:
        doc.error(f"{path}.key", problem)
    elif key in IP_KEYS:
        _ips(doc, values, f"{path}.values")
        _ips(doc, not_values, f"{path}.notValues")
    elif key == "source.trustDomain":
        for field, items in (("values", values), ("notValues", not_values)):
            for i, value in enumerate(items):
                if (problem := trust_domain_problem(value)) is not None:
                    doc.error(f"{path}.{field}[{i}]", problem)
    elif key == "destination.port":
        _ports(doc, values, f"{path}.values")
        _ports(doc, not_values, f"{path}.notValues")
    elif key.startswith("request.headers["):
        name = key[len("request.headers["):-1]
        if not is_header_name(name):
            doc.error(f"{path}.key", f"{name!r} is not a valid HTTP header name")
    return m.Condition(key, values, not_values)


def _rule(doc: DocProblems, spec: Mapping[str, Any] | None, path: str) -> m.Rule:
    spec = spec or {}
    sources, operations = [], []
    for i, entry in enumerate(spec.get("from") or ()):
        sub = f"{path}.from[{i}]"
        if not entry or entry.get("source") is None:
            doc.error(f"{sub}.source", "`from.source` must not be nil")
            continue
        sources.append(_source(doc, entry["source"], f"{sub}.source"))
    for i, entry in enumerate(spec.get("to") or ()):
        sub = f"{path}.to[{i}]"
        if not entry or entry.get("operation") is None:
            doc.error(f"{sub}.operation", "`to.operation` must not be nil")
            continue
        operations.append(_operation(doc, entry["operation"], f"{sub}.operation"))
    when = tuple(_condition(doc, c or {}, f"{path}.when[{i}]") for i, c in enumerate(spec.get("when") or ()))
    return m.Rule(tuple(sources), tuple(operations), when)


def build_authorization_policy(doc: DocProblems, meta: m.Resource, spec: Mapping[str, Any]) -> m.AuthorizationPolicy:
    scope = _scope(doc, spec)
    action = _enum_name(spec.get("action", "ALLOW"), ACTIONS)
    raw_rules = spec.get("rules") or []
    if action == "CUSTOM":
        doc.error("spec.action", "CUSTOM authorization (an external authorizer, ext_authz) is not implemented by "
                                 "meshproxy: the policy is refused rather than ignored; use ALLOW or DENY")
    elif spec.get("provider") is not None:
        doc.error("spec.provider", f"`provider` must not be with non CUSTOM action, found {action}")
    if action == "DENY" and not raw_rules:
        doc.error("spec.rules", "DENY action without `rules` is meaningless as it will never be triggered, add an "
                                "empty rule `{}` if you want it be triggered for every request")
    rules = tuple(_rule(doc, r, f"spec.rules[{i}]") for i, r in enumerate(raw_rules))
    return m.AuthorizationPolicy(meta=meta, scope=scope, action=action, rules=rules)


# ---------------------------------------------------------------------------------------------- PeerAuthentication


def build_peer_authentication(doc: DocProblems, meta: m.Resource, spec: Mapping[str, Any]) -> m.PeerAuthentication:
    labels = _selector(doc, spec, "spec.selector")
    mode = _enum_name((spec.get("mtls") or {}).get("mode", "UNSET"), MTLS_MODES)
    ports: dict[int, str] = {}
    raw_ports = spec.get("portLevelMtls")
    if raw_ports is not None and not raw_ports:
        doc.error("spec.portLevelMtls", "port level mTLS, if defined, must have at least one element")
    elif raw_ports and not labels:
        doc.error("spec.portLevelMtls", "mesh/namespace peer authentication cannot have port level mTLS")
    for key, value in (raw_ports or {}).items():
        port = int(key)
        if not 1 <= port <= 65535:
            doc.error(f"spec.portLevelMtls.{key}", "port must be in range 1..65535")
        ports[port] = _enum_name((value or {}).get("mode", "UNSET"), MTLS_MODES)
    return m.PeerAuthentication(meta=meta, match_labels=labels, mode=mode, port_level_mtls=ports)


# ---------------------------------------------------------------------------------------------- RequestAuthentication

DEFAULT_JWKS_TIMEOUT = 5.0  # seconds; Istio's default jwksFetch timeout


def _jwks_problem(text: str) -> str | None:
    """A JWKS document PyJWT can use: None, or what is wrong."""
    import jwt  # PyJWT: only the loader of a RequestAuthentication needs it

    try:
        data = json.loads(text)
    except ValueError as exc:
        return f"jwks parse error: not JSON ({exc})"
    try:
        if isinstance(data, dict) and "keys" not in data:
            jwt.PyJWK.from_dict(data)
        else:
            jwt.PyJWKSet.from_dict(data)
    except (jwt.PyJWTError, TypeError, ValueError, KeyError) as exc:
        return f"jwks parse error: {exc}"
    return None


def _jwt_rule(doc: DocProblems, spec: Mapping[str, Any], path: str) -> m.JWTRule:
    issuer, jwks_uri, jwks = spec.get("issuer", ""), spec.get("jwksUri", ""), spec.get("jwks", "")
    audiences = _strings(spec, "audiences")
    for i, audience in enumerate(audiences):
        if not audience:
            doc.error(f"{path}.audiences[{i}]", "audience must be non-empty string")
    if not issuer and not jwks_uri:
        doc.error(path, "issuer or jwksUri must be non-empty string")
    if jwks_uri:
        parts = urlsplit(jwks_uri)
        if parts.scheme not in ("http", "https"):
            doc.error(f"{path}.jwksUri", f"URI scheme {parts.scheme!r} is not supported (http or https)")
        elif not parts.hostname:
            doc.error(f"{path}.jwksUri", f"{jwks_uri!r} has no host")
        if jwks:
            doc.warn(f"{path}.jwksUri", "jwks is set too: the inline jwks is used, jwksUri is not fetched (as Istio)")
    if jwks and (problem := _jwks_problem(jwks)) is not None:
        doc.error(f"{path}.jwks", problem)
    if not jwks and not jwks_uri and issuer and urlsplit(issuer).scheme not in ("http", "https"):
        doc.warn(f"{path}.issuer", f"no jwks or jwksUri: the keys are looked up at {issuer}/.well-known/"
                                   "openid-configuration (as istiod does), which needs an http(s) issuer: every "
                                   "token of this issuer will fail")
    headers = []
    for i, location in enumerate(spec.get("fromHeaders") or ()):
        name = (location or {}).get("name", "")
        if not name:
            doc.error(f"{path}.fromHeaders[{i}].name", "location header name must be non-empty string")
        elif not is_header_name(name):
            doc.error(f"{path}.fromHeaders[{i}].name", f"{name!r} is not a valid HTTP header name")
        headers.append(m.JWTHeader(header_key(name), (location or {}).get("prefix", "")))
    for key, what in (("fromParams", "location query"), ("fromCookies", "cookie name")):
        for i, value in enumerate(spec.get(key) or ()):
            if not value:
                doc.error(f"{path}.{key}[{i}]", f"{what} must be non-empty string")
    claims = []
    for i, item in enumerate(spec.get("outputClaimToHeaders") or ()):
        sub = f"{path}.outputClaimToHeaders[{i}]"
        header, claim = (item or {}).get("header", ""), (item or {}).get("claim", "")
        if not header or not claim:
            doc.error(sub, "outputClaimToHeaders header and claim value must be non-empty string")
        elif not is_header_name(header) or header.startswith(":"):
            doc.error(f"{sub}.header", f"{header!r} is not a valid HTTP header name")
        claims.append(m.ClaimToHeader(header_key(header), claim))
    payload_header = spec.get("outputPayloadToHeader", "")
    if payload_header and not is_header_name(payload_header):
        doc.error(f"{path}.outputPayloadToHeader", f"{payload_header!r} is not a valid HTTP header name")
    timeout = spec.get("timeout")
    return m.JWTRule(
        issuer=issuer, audiences=audiences, jwks_uri=jwks_uri, jwks=jwks, from_headers=tuple(headers),
        from_params=_strings(spec, "fromParams"), from_cookies=_strings(spec, "fromCookies"),
        output_payload_to_header=header_key(payload_header),
        forward_original_token=bool(spec.get("forwardOriginalToken", False)),
        output_claim_to_headers=tuple(claims),
        timeout=parse_duration(timeout) if timeout is not None else DEFAULT_JWKS_TIMEOUT,
    )


def build_request_authentication(doc: DocProblems, meta: m.Resource,
                                 spec: Mapping[str, Any]) -> m.RequestAuthentication:
    scope = _scope(doc, spec)
    rules = tuple(_jwt_rule(doc, r or {}, f"spec.jwtRules[{i}]") for i, r in enumerate(spec.get("jwtRules") or ()))
    return m.RequestAuthentication(meta=meta, scope=scope, jwt_rules=rules)
