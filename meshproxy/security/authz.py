"""AuthorizationPolicy, compiled at load into plain predicates; evaluated per request with Istio's semantics.

Pure: no asyncio, no I/O. `compile_authz` turns the policies that apply to this workload into an `Authorizer`
(or `NO_AUTHZ` when none does, so the data path pays one identity check). Istio's order (envoy RBAC filters as
istiod builds them): CUSTOM (refused at load), then DENY (any match denies), then ALLOW (when any ALLOW policy
applies, the request must match one of them), AUDIT only marks.

How one rule matches, exactly as istiod's authz model generates Envoy's RBAC config (pilot/pkg/security/authz):
- a rule is `from` AND `to` AND `when`; a missing part matches anything; entries of `from` (of `to`) OR;
  the fields of one `source` (one `operation`) AND; a field's values OR; its `not` values: none may match;
- a string value is exact, `abc*` prefix, `*abc` suffix, `*` any non-empty value (a header's `*`: present);
- principals are matched against the peer's SPIFFE URI (`spiffe://` + value), namespaces and service accounts
  by the `/ns/NS/` and `/sa/SA` parts of it; plaintext peers have no principal: no principal value matches them,
  every `notPrincipals` does;
- requestPrincipals are `iss/sub` (split at the last `/`), each side matched on its own;
- hosts are matched case-insensitively against the whole `:authority` (port included, as Envoy sees it), paths
  against the path without the query; a path with `{*}` (one segment) or `{**}` (any rest) is an Envoy URI
  template (Istio 1.19+);
- request.auth.audiences/presenter/claims[...] match when any element of the claim (string or list of strings)
  matches any value; nested claims are `claims[a][b]`.

Plain TCP connections get their own Authorizer (`compile_authz(..., for_tcp=True)`), as istiod builds the network
RBAC filter of a TCP filter chain (builder.go, model.go `Generate(forTCP)`): a field only HTTP has (`hosts`,
`methods`, `paths`, `requestPrincipals`, `request.headers[...]`, `request.auth.*`) makes an ALLOW rule that uses it
match nothing (istiod skips the rule; an ALLOW policy left without rules still applies and allows nothing), and
is dropped from a DENY or AUDIT rule, which then matches on what is left (it denies more).
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

import re2

from ..istio import model as m
from .scope import Workload, selects

log = logging.getLogger("meshproxy.authz")

SPIFFE: Final = "spiffe://"
DENIED_NONE: Final = "none"  # Envoy's effective policy id when no ALLOW policy matched

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class AuthzRequest:
    """What a policy may ask of a request, gathered once per request (only when a policy applies)."""

    __slots__ = ("method", "path", "authority", "headers", "principal", "source_ip", "remote_ip",
                 "destination_ip", "destination_port", "sni", "claims")

    def __init__(self, method: str, path: str, authority: str, headers: Sequence[tuple[bytes, bytes]],
                 principal: str = "", source_ip: str = "", remote_ip: str = "", destination_ip: str = "",
                 destination_port: int = 0, sni: str = "", claims: Mapping[str, Any] | None = None) -> None:
        self.method = method
        self.path = path  # without the query
        self.authority = authority
        self.headers = headers  # (lower-case name, value)
        self.principal = peer_uri(principal)  # the peer's SPIFFE URI, "" when plaintext
        self.source_ip = _ip(source_ip)
        # Envoy: the XFF address when it is a valid IP, else the connection's peer
        self.remote_ip = (_ip(remote_ip) if remote_ip else None) or self.source_ip
        self.destination_ip = _ip(destination_ip)
        self.destination_port = destination_port
        self.sni = sni
        self.claims = claims  # the verified JWT payload; None without one

    def header(self, name: bytes) -> str | None:
        """All values of a header joined with `,` (as Envoy matches a repeated header); None when absent."""
        if name == b":authority":  # HTTP/2 names of what HTTP/1.1 carries elsewhere
            return self.authority
        if name == b":method":
            return self.method
        values = [v for k, v in self.headers if k == name]
        if not values:
            return None
        return b",".join(values).decode("latin-1")


def peer_uri(principal: str) -> str:
    """The peer identity as the URI SAN of its certificate: `spiffe://td/ns/NS/sa/SA` ("" when none)."""
    if not principal or principal.startswith(SPIFFE):
        return principal
    return SPIFFE + principal


def _ip(text: str) -> IPAddress | None:
    if not text:
        return None
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


Predicate = Callable[[AuthzRequest], bool]


# ------------------------------------------------------------------------------------------------ string matchers


@dataclass(frozen=True, slots=True)
class StringPattern:
    """Istio's StringMatcher: exact, `abc*` prefix, `*abc` suffix, `*` any non-empty value."""

    kind: str  # exact | prefix | suffix | any | regex
    value: str = ""
    ignore_case: bool = False
    regex: Any = None

    @classmethod
    def of(cls, value: str, prefix: str = "", ignore_case: bool = False) -> StringPattern:
        if value == "*":
            return cls("any")
        if value.startswith("*"):
            if prefix:  # istiod: `spiffe://.*<suffix>`
                return cls.of_regex(re.escape(prefix) + ".*" + re.escape(value[1:]))
            text, kind = value[1:], "suffix"
        elif value.endswith("*"):
            text, kind = prefix + value[:-1], "prefix"
        else:
            text, kind = prefix + value, "exact"
        return cls(kind, text.lower() if ignore_case else text, ignore_case)

    @classmethod
    def of_regex(cls, pattern: str) -> StringPattern:
        return cls("regex", pattern, regex=re2.compile(pattern))

    def matches(self, text: str) -> bool:
        if self.ignore_case:
            text = text.lower()
        kind = self.kind
        if kind == "exact":
            return text == self.value
        if kind == "prefix":
            return text.startswith(self.value)
        if kind == "suffix":
            return text.endswith(self.value)
        if kind == "any":
            return text != ""
        return self.regex.fullmatch(text) is not None


def _field(get: Callable[[AuthzRequest], Any], values: Sequence[Any], not_values: Sequence[Any],
           test: Callable[[Any, Any], bool]) -> Predicate | None:
    """A field with values (one must match) and notValues (none may match); None when both are empty."""
    if not values and not not_values:
        return None
    yes, no = tuple(values), tuple(not_values)

    def check(req: AuthzRequest) -> bool:
        actual = get(req)
        if yes and not any(test(pattern, actual) for pattern in yes):
            return False
        return not (no and any(test(pattern, actual) for pattern in no))

    return check


def _string_test(pattern: StringPattern, actual: str | None) -> bool:
    return actual is not None and pattern.matches(actual)


def _header_test(pattern: StringPattern | None, actual: str | None) -> bool:
    """A header's `*` is presence (compiled as None); other values are string patterns."""
    if actual is None:
        return False
    return pattern is None or pattern.matches(actual)


def _list_test(pattern: StringPattern, actual: Any) -> bool:
    """A JWT claim: a string, or a list of which one element must match (Envoy's ListMatcher one_of)."""
    if isinstance(actual, str):
        return pattern.matches(actual)
    if isinstance(actual, list):
        return any(isinstance(item, str) and pattern.matches(item) for item in actual)
    return False


def _ip_test(network: IPNetwork, actual: IPAddress | None) -> bool:
    return actual is not None and actual.version == network.version and actual in network


def _network(text: str) -> IPNetwork:
    return ipaddress.ip_network(text.strip("[]"), strict=False)


def _principal_pattern(value: str) -> StringPattern:
    return StringPattern.of(value, SPIFFE)


def _namespace_pattern(value: str) -> StringPattern:
    return StringPattern.of_regex(".*/ns/" + re.escape(value).replace(r"\*", ".*") + "/.*")


def _service_account_pattern(value: str, policy_namespace: str) -> StringPattern:
    namespace, sep, account = value.partition("/")
    if not sep:
        namespace, account = policy_namespace, value
    return StringPattern.of_regex(f"spiffe://.+/ns/{re.escape(namespace)}/(.+/|)sa/{re.escape(account)}(/.+)?")


def _trust_domain_pattern(value: str) -> StringPattern:
    """istiod's srcTrustDomainGenerator: the trust domain part of the peer's SPIFFE URI."""
    if value == "*":
        return StringPattern("prefix", SPIFFE)
    if "*" not in value:
        return StringPattern("prefix", f"{SPIFFE}{value}/")
    before, _, after = value.partition("*")
    return StringPattern.of_regex(f"spiffe://{re.escape(before)}[^/]*{re.escape(after)}/.*")


ANY_NON_EMPTY: Final = StringPattern("any")


def _request_principal_pattern(value: str) -> tuple[StringPattern, StringPattern]:
    """istiod's requestPrincipalGenerator: (issuer pattern, subject pattern)."""
    index = value.rfind("/")
    found = index >= 0
    iss, sub = (value[:index], value[index + 1:]) if found else (value, "")
    if value == "*":
        return ANY_NON_EMPTY, ANY_NON_EMPTY
    if value.startswith("*"):
        if found:
            return (ANY_NON_EMPTY if iss == "*" else StringPattern("suffix", iss[1:])), StringPattern("exact", sub)
        return ANY_NON_EMPTY, StringPattern("suffix", value[1:])
    if value.endswith("*"):
        if found:
            return StringPattern("exact", iss), (ANY_NON_EMPTY if sub == "*" else StringPattern("prefix", sub[:-1]))
        return StringPattern("prefix", value[:-1]), ANY_NON_EMPTY
    return StringPattern("exact", iss), StringPattern("exact", sub)


def _request_principal_test(patterns: tuple[StringPattern, StringPattern], claims: Mapping[str, Any] | None) -> bool:
    if claims is None:
        return False
    iss, sub = claims.get("iss"), claims.get("sub")
    return isinstance(iss, str) and isinstance(sub, str) and patterns[0].matches(iss) and patterns[1].matches(sub)


# Envoy's URI template: `*` one path segment of pchars, `**` the rest (pchars and `/`), literals as written.
PCHARS: Final = r"a-zA-Z0-9\-._~%!$&'()+,;:@="


def path_template_regex(template: str) -> str:
    out = []
    for part in re.split(r"(\{\*\*\}|\{\*\})", template):
        if part == "{**}":
            out.append(f"[{PCHARS}/]*")
        elif part == "{*}":
            out.append(f"[{PCHARS}]+")
        else:
            out.append(re.escape(part))
    return "".join(out)


def _path_pattern(value: str) -> StringPattern:
    if "{*}" in value or "{**}" in value:
        return StringPattern.of_regex(path_template_regex(value))
    return StringPattern.of(value)


# ------------------------------------------------------------------------------------------------ getters


def _get_principal(req: AuthzRequest) -> str | None:
    return req.principal or None


def _get_claims(req: AuthzRequest) -> Mapping[str, Any] | None:
    return req.claims


def _claim_getter(path: Sequence[str]) -> Callable[[AuthzRequest], Any]:
    def get(req: AuthzRequest) -> Any:
        value: Any = req.claims
        for name in path:
            if not isinstance(value, dict):
                return None
            value = value.get(name)
        return value

    return get


def _remote_ip(req: AuthzRequest) -> IPAddress | None:
    return req.remote_ip


def _source_ip(req: AuthzRequest) -> IPAddress | None:
    return req.source_ip


def _destination_ip(req: AuthzRequest) -> IPAddress | None:
    return req.destination_ip


def _destination_port(req: AuthzRequest) -> int:
    return req.destination_port


def _port_test(port: int, actual: int) -> bool:
    return port == actual


def _method(req: AuthzRequest) -> str:
    return req.method


def _path(req: AuthzRequest) -> str:
    return req.path


def _authority(req: AuthzRequest) -> str:
    return req.authority


def _sni(req: AuthzRequest) -> str | None:
    return req.sni or None


def _header_getter(name: bytes) -> Callable[[AuthzRequest], str | None]:
    def get(req: AuthzRequest) -> str | None:
        return req.header(name)

    return get


def _header_patterns(values: Iterable[str]) -> list[StringPattern | None]:
    return [None if v == "*" else StringPattern.of(v) for v in values]


def claim_path(key: str) -> list[str]:
    """`request.auth.claims[a][b]` -> ["a", "b"]."""
    return re.findall(r"\[([^\[\]]+)\]", key[len("request.auth.claims"):])


# ------------------------------------------------------------------------------------------------ compile


def _source_checks(source: m.Source, namespace: str) -> list[Predicate]:
    checks = [
        _field(_get_principal, [_principal_pattern(v) for v in source.principals],
               [_principal_pattern(v) for v in source.not_principals], _string_test),
        _field(_get_principal, [_namespace_pattern(v) for v in source.namespaces],
               [_namespace_pattern(v) for v in source.not_namespaces], _string_test),
        _field(_get_principal, [_service_account_pattern(v, namespace) for v in source.service_accounts],
               [_service_account_pattern(v, namespace) for v in source.not_service_accounts], _string_test),
        _field(_get_principal, [_trust_domain_pattern(v) for v in source.trust_domains],
               [_trust_domain_pattern(v) for v in source.not_trust_domains], _string_test),
        _field(_get_claims, [_request_principal_pattern(v) for v in source.request_principals],
               [_request_principal_pattern(v) for v in source.not_request_principals], _request_principal_test),
        _field(_source_ip, [_network(v) for v in source.ip_blocks], [_network(v) for v in source.not_ip_blocks],
               _ip_test),
        _field(_remote_ip, [_network(v) for v in source.remote_ip_blocks],
               [_network(v) for v in source.not_remote_ip_blocks], _ip_test),
    ]
    return [c for c in checks if c is not None]


def _operation_checks(operation: m.Operation) -> list[Predicate]:
    checks = [
        _field(_authority, [StringPattern.of(v, ignore_case=True) for v in operation.hosts if v != "*"] +
               (["*"] if "*" in operation.hosts else []),
               [StringPattern.of(v, ignore_case=True) for v in operation.not_hosts if v != "*"] +
               (["*"] if "*" in operation.not_hosts else []), _host_test),
        _field(_destination_port, [int(v) for v in operation.ports], [int(v) for v in operation.not_ports],
               _port_test),
        _field(_method, _header_patterns(operation.methods), _header_patterns(operation.not_methods), _header_test),
        _field(_path, [_path_pattern(v) for v in operation.paths], [_path_pattern(v) for v in operation.not_paths],
               _string_test),
    ]
    return [c for c in checks if c is not None]


def _host_test(pattern: StringPattern | str, actual: str) -> bool:
    """A host `*` is presence of `:authority` (always there); others match case-insensitively."""
    if isinstance(pattern, str):
        return True
    return pattern.matches(actual)


def _condition_check(condition: m.Condition, namespace: str) -> Predicate:
    key, values, not_values = condition.key, condition.values, condition.not_values
    check: Predicate | None
    if key.startswith("request.headers["):
        name = key[len("request.headers["):-1].lower().encode("latin-1")
        check = _field(_header_getter(name), _header_patterns(values), _header_patterns(not_values), _header_test)
    elif key.startswith("request.auth.claims["):
        check = _field(_claim_getter(claim_path(key)), [StringPattern.of(v) for v in values],
                       [StringPattern.of(v) for v in not_values], _list_test)
    elif key == "request.auth.principal":
        check = _field(_get_claims, [_request_principal_pattern(v) for v in values],
                       [_request_principal_pattern(v) for v in not_values], _request_principal_test)
    elif key in ("request.auth.audiences", "request.auth.presenter"):
        claim = "aud" if key == "request.auth.audiences" else "azp"
        check = _field(_claim_getter([claim]), [StringPattern.of(v) for v in values],
                       [StringPattern.of(v) for v in not_values], _list_test)
    elif key in ("source.ip", "remote.ip", "destination.ip"):
        get = {"source.ip": _source_ip, "remote.ip": _remote_ip, "destination.ip": _destination_ip}[key]
        check = _field(get, [_network(v) for v in values], [_network(v) for v in not_values], _ip_test)
    elif key == "source.namespace":
        check = _field(_get_principal, [_namespace_pattern(v) for v in values],
                       [_namespace_pattern(v) for v in not_values], _string_test)
    elif key == "source.principal":
        check = _field(_get_principal, [_principal_pattern(v) for v in values],
                       [_principal_pattern(v) for v in not_values], _string_test)
    elif key == "source.serviceAccount":
        check = _field(_get_principal, [_service_account_pattern(v, namespace) for v in values],
                       [_service_account_pattern(v, namespace) for v in not_values], _string_test)
    elif key == "source.trustDomain":
        check = _field(_get_principal, [_trust_domain_pattern(v) for v in values],
                       [_trust_domain_pattern(v) for v in not_values], _string_test)
    elif key == "destination.port":
        check = _field(_destination_port, [int(v) for v in values], [int(v) for v in not_values], _port_test)
    elif key == "connection.sni":
        check = _field(_sni, [StringPattern.of(v) for v in values], [StringPattern.of(v) for v in not_values],
                       _string_test)
    else:  # the loader refuses every other key (istio/build_security.py)
        raise ValueError(f"unsupported when key {key!r}")
    assert check is not None  # the loader requires values or notValues
    return check


def _all(checks: Sequence[Predicate]) -> Predicate:
    def check(req: AuthzRequest) -> bool:
        return all(c(req) for c in checks)

    return check


def _match_all(req: AuthzRequest) -> bool:
    return True


@dataclass(frozen=True, slots=True)
class CompiledRule:
    policy_id: str  # Envoy's RBAC policy name: ns[NS]-policy[NAME]-rule[i]
    when: tuple[Predicate, ...]
    sources: tuple[Predicate, ...]  # empty: any source
    operations: tuple[Predicate, ...]  # empty: any operation

    def matches(self, req: AuthzRequest) -> bool:
        for check in self.when:
            if not check(req):
                return False
        if self.sources and not any(source(req) for source in self.sources):
            return False
        return not self.operations or any(operation(req) for operation in self.operations)


# Fields and `when` keys only an HTTP request has (istiod's generators answer "is HTTP only" for TCP).
HTTP_ONLY_KEYS: Final = ("request.headers[", "request.auth.")


def _http_only_key(key: str) -> bool:
    return key.startswith(HTTP_ONLY_KEYS)


def uses_http_only(rule: m.Rule) -> bool:
    """Whether a rule names anything only an HTTP request has (values or notValues)."""
    return any(s.request_principals or s.not_request_principals for s in rule.sources) or \
        any(o.hosts or o.not_hosts or o.methods or o.not_methods or o.paths or o.not_paths
            for o in rule.operations) or any(_http_only_key(c.key) for c in rule.when)


def without_http_fields(rule: m.Rule) -> m.Rule:
    """A DENY or AUDIT rule as istiod generates it for TCP: its HTTP-only fields dropped (what is left still
    constrains; a `from` or `to` entry left empty matches any connection)."""
    return m.Rule(
        sources=tuple(replace(s, request_principals=(), not_request_principals=()) for s in rule.sources),
        operations=tuple(replace(o, hosts=(), not_hosts=(), methods=(), not_methods=(), paths=(), not_paths=())
                         for o in rule.operations),
        when=tuple(c for c in rule.when if not _http_only_key(c.key)))


def compile_rule(policy: m.AuthorizationPolicy, index: int, rule: m.Rule) -> CompiledRule:
    namespace = policy.meta.namespace
    return CompiledRule(
        policy_id=f"ns[{namespace}]-policy[{policy.meta.name}]-rule[{index}]",
        when=tuple(_condition_check(c, namespace) for c in rule.when),
        sources=tuple(_all(_source_checks(s, namespace)) for s in rule.sources),
        operations=tuple(_all(_operation_checks(o)) for o in rule.operations),
    )


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    policy_id: str = ""  # the DENY rule that matched, or "none" when no ALLOW rule did


ALLOWED: Final = Decision(True)


@dataclass(frozen=True, slots=True)
class Authorizer:
    """The policies that apply to one workload, by action, in load order."""

    deny: tuple[CompiledRule, ...] = ()
    allow: tuple[CompiledRule, ...] = ()
    has_allow_policy: bool = False  # an ALLOW policy with no rules still applies (and allows nothing)
    audit: tuple[CompiledRule, ...] = ()
    needs_local_ip: bool = False  # a rule reads destination.ip (the connection's local address, looked up then)
    # Policies annotated `istio.io/dry-run: "true"`: decided on the side and logged, never enforced (Istio's
    # shadow rules).
    dry_run: Authorizer | None = None

    def check(self, req: AuthzRequest) -> Decision:
        for rule in self.deny:
            if rule.matches(req):
                return Decision(False, rule.policy_id)
        if self.has_allow_policy:
            for rule in self.allow:
                if rule.matches(req):
                    return ALLOWED
            return Decision(False, DENIED_NONE)
        return ALLOWED

    def audited(self, req: AuthzRequest) -> str:
        """The AUDIT rule that matches (its id), or "": AUDIT marks a request, never decides it."""
        for rule in self.audit:
            if rule.matches(req):
                return rule.policy_id
        return ""

    @property
    def empty(self) -> bool:
        return not (self.deny or self.has_allow_policy or self.audit or self.dry_run)


NO_AUTHZ: Final = Authorizer()


def applicable(policies: Iterable[m.AuthorizationPolicy], workload: Workload) -> list[m.AuthorizationPolicy]:
    return [p for p in policies if selects(p.meta, p.scope, workload)]


DRY_RUN_ANNOTATION: Final = "istio.io/dry-run"


def compile_authz(policies: Iterable[m.AuthorizationPolicy], workload: Workload, for_tcp: bool = False
                  ) -> Authorizer:
    """The Authorizer of `workload` (of its plain TCP connections with `for_tcp`); NO_AUTHZ (the same object) when
    no policy applies."""
    selected = applicable(policies, workload)
    enforced = [p for p in selected if p.meta.annotations.get(DRY_RUN_ANNOTATION, "").lower() != "true"]
    dry = [p for p in selected if p.meta.annotations.get(DRY_RUN_ANNOTATION, "").lower() == "true"]
    shadow = _compile(dry, None, for_tcp) if dry else None
    authorizer = _compile(enforced, shadow, for_tcp)
    return NO_AUTHZ if authorizer.empty else authorizer


def _rules_of(policy: m.AuthorizationPolicy, for_tcp: bool) -> list[CompiledRule]:
    """The compiled rules of one policy, each keeping its index in the policy (Envoy's policy id)."""
    if not for_tcp:
        return [compile_rule(policy, i, rule) for i, rule in enumerate(policy.rules)]
    if policy.action == "ALLOW":  # istiod skips the rule on a TCP filter chain: it allows nothing there
        return [compile_rule(policy, i, rule) for i, rule in enumerate(policy.rules) if not uses_http_only(rule)]
    return [compile_rule(policy, i, without_http_fields(rule)) for i, rule in enumerate(policy.rules)]


def _compile(policies: Sequence[m.AuthorizationPolicy], dry_run: Authorizer | None = None, tcp: bool = False
             ) -> Authorizer:
    deny: list[CompiledRule] = []
    allow: list[CompiledRule] = []
    audit: list[CompiledRule] = []
    has_allow = False
    for policy in policies:
        rules = _rules_of(policy, tcp)
        if policy.action == "DENY":
            deny += rules
        elif policy.action == "AUDIT":
            audit += rules
        elif policy.action == "ALLOW":
            has_allow = True
            allow += rules
        else:  # CUSTOM never gets past the loader; refuse rather than skip if it ever did
            raise ValueError(f"{policy.meta.origin}: action {policy.action} is not enforced by meshproxy")
    needs_local_ip = any(c.key == "destination.ip" for p in policies for r in p.rules for c in r.when) or \
        (dry_run is not None and dry_run.needs_local_ip)
    return Authorizer(tuple(deny), tuple(allow), has_allow, tuple(audit), needs_local_ip, dry_run)
