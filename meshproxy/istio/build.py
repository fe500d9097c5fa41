"""The value pass and the model: a schema-checked spec -> frozen model objects (istio/model.py).

Checks what Istio's validation webhook rejects (RE2 regexes, weights, durations,
status codes, host names...) while building, so each value is read once: regexes
are kept compiled, durations as float seconds, header names lower-case.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import Any

from . import model as m
from .problems import DocProblems
from .retry_annotation import held_bytes
from .values import compile_regex, header_key, is_header_name, parse_duration, retry_on_problems

MAX_DIRECT_RESPONSE_BYTES = 1 << 20
HOST_LABEL_RE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_]*[A-Za-z0-9])?")
REDIRECT_CODES = (301, 302, 303, 307, 308)
SE_RESOLUTIONS = ("NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN", "DYNAMIC_DNS")
H2_UPGRADE_POLICIES = ("DEFAULT", "DO_NOT_UPGRADE", "UPGRADE")  # ConnectionPoolSettings.HTTPSettings.H2UpgradePolicy
PORT_PROTOCOLS = ("HTTP", "HTTPS", "GRPC", "GRPC-WEB", "HTTP2", "MONGO", "TCP", "TLS", "UDP", "REDIS", "MYSQL")


def build_resource(doc: DocProblems, meta: m.Resource) -> Any:
    """The model object of a checked resource (None for kinds meshproxy reads but does not use)."""
    return BUILDERS[meta.kind](doc, meta, meta.spec)


def _duration(doc: DocProblems, spec: Mapping[str, Any], key: str, path: str, *, ms_precision: bool = True) -> float | None:
    raw = spec.get(key)
    if raw is None:
        return None
    seconds = parse_duration(raw)
    if ms_precision:
        if seconds < 0.001:
            doc.error(f"{path}.{key}", f"{raw!r}: duration must be at least 1ms")
        elif abs(seconds * 1000 - round(seconds * 1000)) > 1e-6:
            doc.error(f"{path}.{key}", f"{raw!r}: only durations to ms precision are supported")
    return seconds


def _regex(doc: DocProblems, pattern: str, path: str) -> Any:
    """The compiled regex, kept in the model so that routing does not compile it again; None if invalid."""
    try:
        return compile_regex(pattern)
    except ValueError as exc:
        doc.error(path, str(exc))
        return None


def _string_match(doc: DocProblems, spec: Mapping[str, Any] | None, path: str, *, header: bool = False) -> m.StringMatch | None:
    if spec is None:
        return None
    if not spec:
        return m.StringMatch("present")
    if "exact" in spec:
        return m.StringMatch("exact", spec["exact"])
    if "prefix" in spec:
        if spec["prefix"] == "":
            doc.error(f"{path}.prefix", "empty prefix is invalid; use {} to match presence")
        return m.StringMatch("prefix", spec["prefix"])
    regex = spec.get("regex", "")
    if header and regex == "*":
        return m.StringMatch("present")  # Istio special-cases regex "*" as presence
    return m.StringMatch("regex", regex, _regex(doc, regex, f"{path}.regex"))


def _header_name_ok(doc: DocProblems, name: str, path: str) -> None:
    if not is_header_name(name):
        doc.error(path, f"{name!r} is not a valid HTTP header name")
    elif "_" in name and not name.startswith(":"):
        doc.warn(path, f"header name {name!r} has an underscore: proxies and load balancers often drop such headers")


def _header_matches(doc: DocProblems, spec: Mapping[str, Any] | None, path: str) -> tuple[tuple[str, m.StringMatch], ...]:
    out = []
    for name, match in (spec or {}).items():
        sub = f"{path}.{name}"
        if name.startswith("@request.auth.claims"):
            doc.warn(sub, "JWT claim matches need RequestAuthentication, which meshproxy does not implement: never matches")
        else:
            _header_name_ok(doc, name, sub)
        string_match = _string_match(doc, match or {}, sub, header=True)
        if string_match is not None:
            out.append((header_key(name), string_match))
    return tuple(out)


def _match_request(doc: DocProblems, spec: Mapping[str, Any], path: str) -> m.HTTPMatchRequest:
    query = []
    for name, match in (spec.get("queryParams") or {}).items():
        query.append((name, _string_match(doc, match or {}, f"{path}.queryParams.{name}") or m.StringMatch("present")))
    port = spec.get("port")
    if port is not None and not 1 <= port <= 65535:
        doc.error(f"{path}.port", f"{port} is not a valid port")
    uri = _string_match(doc, spec.get("uri"), f"{path}.uri")
    if spec.get("ignoreUriCase") and uri is not None and uri.kind == "regex":
        doc.warn(f"{path}.ignoreUriCase", "ignoreUriCase does not apply to regex matches (as in Envoy)")
    return m.HTTPMatchRequest(
        name=spec.get("name", ""),
        uri=uri,
        scheme=_string_match(doc, spec.get("scheme"), f"{path}.scheme"),
        method=_string_match(doc, spec.get("method"), f"{path}.method"),
        authority=_string_match(doc, spec.get("authority"), f"{path}.authority"),
        headers=_header_matches(doc, spec.get("headers"), f"{path}.headers"),
        without_headers=_header_matches(doc, spec.get("withoutHeaders"), f"{path}.withoutHeaders"),
        query_params=tuple(query),
        ignore_uri_case=bool(spec.get("ignoreUriCase", False)),
        port=port,
        source_labels=dict(spec.get("sourceLabels") or {}),
        source_namespace=spec.get("sourceNamespace", ""),
        gateways=tuple(spec.get("gateways") or ()),
    )


def _port_selector(doc: DocProblems, spec: Mapping[str, Any] | None, path: str) -> int | None:
    if not spec or spec.get("number") is None:
        return None
    number = int(spec["number"])
    if not 1 <= number <= 65535:
        doc.error(f"{path}.number", f"{number} is not a valid port")
    return number


def _destination(doc: DocProblems, spec: Mapping[str, Any] | None, path: str) -> m.Destination:
    spec = spec or {}
    host = spec.get("host", "")
    if not host:
        doc.error(f"{path}.host", "destination host is required")
    elif host == "*":
        doc.error(f"{path}.host", "invalid destination host *")
    elif not _valid_host(host.removeprefix("*.")):
        doc.error(f"{path}.host", f"{host!r} is not a valid host name")
    return m.Destination(host=host, subset=spec.get("subset", ""), port=_port_selector(doc, spec.get("port"), f"{path}.port"))


def _header_operations(doc: DocProblems, spec: Mapping[str, Any] | None, path: str) -> m.HeaderOperations:
    spec = spec or {}
    for op in ("set", "add"):
        for name in spec.get(op) or {}:
            _header_name_ok(doc, name, f"{path}.{op}.{name}")
    for i, name in enumerate(spec.get("remove") or ()):
        _header_name_ok(doc, name, f"{path}.remove[{i}]")
    return m.HeaderOperations(
        set=tuple((header_key(k), v) for k, v in (spec.get("set") or {}).items()),
        add=tuple((header_key(k), v) for k, v in (spec.get("add") or {}).items()),
        remove=tuple(header_key(n) for n in spec.get("remove") or ()),
    )


def _headers(doc: DocProblems, spec: Mapping[str, Any] | None, path: str) -> m.Headers | None:
    if spec is None:
        return None
    return m.Headers(
        request=_header_operations(doc, spec.get("request"), f"{path}.request"),
        response=_header_operations(doc, spec.get("response"), f"{path}.response"),
    )


def _percentage(doc: DocProblems, spec: Mapping[str, Any], path: str) -> float:
    """`percentage: {value: double}`, or the deprecated integer `percent`; absent -> 0 (never fires)."""
    if spec.get("percentage") is not None:
        value = float(spec["percentage"].get("value", 0.0))
        sub = f"{path}.percentage.value"
    elif spec.get("percent") is not None:
        value, sub = float(spec["percent"]), f"{path}.percent"
    else:
        return 0.0
    if not 0.0 <= value <= 100.0:
        doc.error(sub, f"{value} is not a percentage between 0 and 100")
    return value


def _fault(doc: DocProblems, spec: Mapping[str, Any] | None, path: str) -> m.HTTPFaultInjection | None:
    if spec is None:
        return None
    delay = abort = None
    if (d := spec.get("delay")) is not None:
        sub = f"{path}.delay"
        fixed = _duration(doc, d, "fixedDelay", sub)
        if d.get("exponentialDelay") is not None:
            doc.error(f"{sub}.exponentialDelay", "exponentialDelay is not supported (as in Istio)")
        elif fixed is None:
            doc.error(f"{sub}.fixedDelay", "fixedDelay is required")
        delay = m.Delay(fixed_delay=fixed or 0.0, percentage=_percentage(doc, d, sub))
    if (a := spec.get("abort")) is not None:
        sub = f"{path}.abort"
        status = a.get("httpStatus")
        if status is not None and not 200 <= status <= 600:
            doc.error(f"{sub}.httpStatus", f"invalid abort http status {status}: not in range 200-599")
        if status is None and not a.get("grpcStatus"):
            if a.get("http2Error"):
                doc.error(f"{sub}.http2Error", "http2Error aborts are not supported on HTTP/1.1")
            else:
                doc.error(sub, "one of httpStatus or grpcStatus is required")
        abort = m.Abort(http_status=status or 0, grpc_status=a.get("grpcStatus", ""), percentage=_percentage(doc, a, sub))
    if delay is None and abort is None:
        doc.error(path, "fault must have a delay or an abort")
    return m.HTTPFaultInjection(delay=delay, abort=abort)


def _retries(doc: DocProblems, spec: Mapping[str, Any] | None, path: str) -> m.HTTPRetry | None:
    if spec is None:
        return None
    attempts = spec.get("attempts", 0)
    if attempts < 0:
        doc.error(f"{path}.attempts", "attempts cannot be negative")
    retry_on = spec.get("retryOn", "")
    for message in retry_on_problems(retry_on):
        doc.error(f"{path}.retryOn", message)
    per_try = _duration(doc, spec, "perTryTimeout", path)
    if attempts == 0 and (per_try is not None or retry_on or spec.get("retryRemoteLocalities") is not None):
        doc.error(path, "http retry policy configured when attempts are set to 0 (disabled)")
    return m.HTTPRetry(
        attempts=attempts,
        per_try_timeout=per_try,
        retry_on=retry_on,
        retry_remote_localities=bool(spec.get("retryRemoteLocalities", False)),
        retry_ignore_previous_hosts=bool(spec.get("retryIgnorePreviousHosts", True)),
        backoff=_duration(doc, spec, "backoff", path),
    )


def _redirect(doc: DocProblems, spec: Mapping[str, Any] | None, path: str) -> m.HTTPRedirect | None:
    if spec is None:
        return None
    code = spec.get("redirectCode") or 301  # proto3: 0 is unset, Envoy's default 301
    if code not in REDIRECT_CODES:
        doc.error(f"{path}.redirectCode", f"{code} is not a redirect code ({', '.join(map(str, REDIRECT_CODES))})")
    if spec.get("uri") and spec.get("prefixRewrite"):
        doc.error(path, "uri and prefixRewrite cannot both be set")
    if not any(spec.get(k) for k in ("uri", "prefixRewrite", "authority", "scheme", "port", "derivePort")):
        doc.error(path, "redirect must specify uri, prefixRewrite, authority, scheme, port or derivePort")
    return m.HTTPRedirect(
        uri=spec.get("uri", ""), prefix_rewrite=spec.get("prefixRewrite", ""), authority=spec.get("authority", ""),
        scheme=spec.get("scheme", ""), port=spec.get("port"), derive_port=spec.get("derivePort", ""),
        redirect_code=code,
    )


def _direct_response(doc: DocProblems, spec: Mapping[str, Any] | None, path: str) -> m.HTTPDirectResponse | None:
    if spec is None:
        return None
    status = spec.get("status")
    if status is None or not 200 <= status <= 600:  # Istio validateHTTPStatus: 200..600
        doc.error(f"{path}.status", f"status {status} must be in range 200-599")
    body_spec = spec.get("body") or {}
    body = b""
    if "string" in body_spec:
        body = body_spec["string"].encode()
    elif "bytes" in body_spec:
        try:
            body = base64.b64decode(body_spec["bytes"], validate=True)
        except ValueError:
            doc.error(f"{path}.body.bytes", "is not valid base64")
    if len(body) > MAX_DIRECT_RESPONSE_BYTES:
        doc.error(f"{path}.body", "direct response body is larger than 1 MB")
    return m.HTTPDirectResponse(status=status or 200, body=body)


def _rewrite(doc: DocProblems, spec: Mapping[str, Any] | None, path: str) -> m.HTTPRewrite | None:
    if spec is None:
        return None
    regex = spec.get("uriRegexRewrite") or {}
    if spec.get("uri") and regex:
        doc.error(path, "uri and uriRegexRewrite cannot both be set")
    compiled = _regex(doc, regex.get("match", ""), f"{path}.uriRegexRewrite.match") if regex else None
    return m.HTTPRewrite(
        uri=spec.get("uri", ""), authority=spec.get("authority", ""),
        uri_regex_match=regex.get("match", ""), uri_regex_rewrite=regex.get("rewrite", ""), uri_regex=compiled,
    )


def _mirrors(doc: DocProblems, spec: Mapping[str, Any], path: str) -> tuple[m.HTTPMirrorPolicy, ...]:
    if spec.get("mirror") and spec.get("mirrors"):
        doc.error(f"{path}.mirrors", "mirror and mirrors cannot both be set")
    out = []
    if spec.get("mirror"):
        percent = 100.0
        if spec.get("mirrorPercentage") is not None:
            percent = float(spec["mirrorPercentage"].get("value", 0.0))
        elif spec.get("mirrorPercent") is not None:
            percent = float(spec["mirrorPercent"])
        out.append(m.HTTPMirrorPolicy(_destination(doc, spec["mirror"], f"{path}.mirror"), percent))
    for i, mirror in enumerate(spec.get("mirrors") or ()):
        percent = float((mirror.get("percentage") or {"value": 100.0}).get("value", 0.0))
        out.append(m.HTTPMirrorPolicy(_destination(doc, mirror.get("destination"), f"{path}.mirrors[{i}].destination"), percent))
    for policy in out:
        if not 0.0 <= policy.percentage <= 100.0:
            doc.error(path, f"mirror percentage {policy.percentage} is not between 0 and 100")
    return tuple(out)


def _cors_origin(doc: DocProblems, spec: Mapping[str, Any], path: str) -> m.StringMatch:
    for kind in ("exact", "prefix"):
        if kind in spec:
            return m.StringMatch(kind, spec[kind])  # type: ignore[arg-type]
    if "regex" in spec:
        return m.StringMatch("regex", spec["regex"], _regex(doc, spec["regex"], f"{path}.regex"))
    return m.StringMatch("present")


def _cors_policy(doc: DocProblems, spec: Mapping[str, Any] | None, path: str) -> m.CorsPolicy | None:
    if not spec:
        return None
    origins = [_cors_origin(doc, o or {}, f"{path}.allowOrigins[{i}]") for i, o in enumerate(spec.get("allowOrigins") or ())]
    origins += [m.StringMatch("exact", o) for o in spec.get("allowOrigin") or ()]
    max_age = spec.get("maxAge")
    return m.CorsPolicy(
        allow_origins=tuple(origins),
        allow_methods=tuple(spec.get("allowMethods") or ()),
        allow_headers=tuple(spec.get("allowHeaders") or ()),
        expose_headers=tuple(spec.get("exposeHeaders") or ()),
        max_age=parse_duration(max_age) if max_age is not None else None,
        allow_credentials=bool(spec.get("allowCredentials", False)),
        unmatched_preflights=str(spec.get("unmatchedPreflights", "FORWARD")),
    )


def _http_route(doc: DocProblems, spec: Mapping[str, Any], path: str) -> m.HTTPRoute:
    has_route, has_redirect = bool(spec.get("route")), spec.get("redirect") is not None
    has_direct, has_delegate = spec.get("directResponse") is not None, spec.get("delegate") is not None
    if has_delegate:
        doc.error(f"{path}.delegate", "delegate VirtualServices are not supported by meshproxy")
    elif has_route + has_redirect + has_direct == 0:
        doc.error(path, "HTTP route, redirect or direct response is required")
    elif has_route and has_redirect:
        doc.error(path, "HTTP route cannot contain both route and redirect")
    elif has_direct and (has_route or has_redirect):
        doc.error(path, "HTTP route cannot contain directResponse together with route or redirect")
    if has_redirect and spec.get("rewrite") is not None:
        doc.error(path, "HTTP route cannot contain both rewrite and redirect")
    destinations = []
    for i, dest in enumerate(spec.get("route") or ()):
        sub = f"{path}.route[{i}]"
        weight = dest.get("weight", 0)
        if weight < 0:
            doc.error(f"{sub}.weight", "weight must not be negative")
        destinations.append(m.HTTPRouteDestination(
            destination=_destination(doc, dest.get("destination"), f"{sub}.destination"),
            weight=weight,
            headers=_headers(doc, dest.get("headers"), f"{sub}.headers"),
        ))
    if len(destinations) > 1 and sum(d.weight for d in destinations) <= 0:
        doc.error(f"{path}.route", "total destination weight must be greater than 0")
    return m.HTTPRoute(
        name=spec.get("name", ""),
        match=tuple(_match_request(doc, mr or {}, f"{path}.match[{i}]") for i, mr in enumerate(spec.get("match") or ())),
        route=tuple(destinations),
        redirect=_redirect(doc, spec.get("redirect"), f"{path}.redirect"),
        direct_response=_direct_response(doc, spec.get("directResponse"), f"{path}.directResponse"),
        rewrite=_rewrite(doc, spec.get("rewrite"), f"{path}.rewrite"),
        timeout=_timeout(doc, spec, path),
        retries=_retries(doc, spec.get("retries"), f"{path}.retries"),
        fault=_fault(doc, spec.get("fault"), f"{path}.fault"),
        mirrors=_mirrors(doc, spec, path),
        cors_policy=_cors_policy(doc, spec.get("corsPolicy"), f"{path}.corsPolicy"),
        headers=_headers(doc, spec.get("headers"), f"{path}.headers"),
    )


def _timeout(doc: DocProblems, spec: Mapping[str, Any], path: str) -> float | None:
    raw = spec.get("timeout")
    if raw is not None and parse_duration(raw) == 0:
        doc.warn(f"{path}.timeout", "0s is rejected by current Istio validation; omit the field to disable the timeout")
        return None  # tolerant: 0s means no timeout, as Envoy reads it
    return _duration(doc, spec, "timeout", path)


def _valid_host(host: str) -> bool:
    return bool(host) and len(host) <= 253 and all(HOST_LABEL_RE.fullmatch(label) for label in host.split("."))


def _hosts(doc: DocProblems, hosts: list[str], path: str, *, wildcard: bool) -> tuple[str, ...]:
    for i, host in enumerate(hosts):
        name = host.removeprefix("*.") if wildcard and host != "*" else host
        if wildcard and host == "*":
            continue
        if not _valid_host(name):
            doc.error(f"{path}[{i}]", f"{host!r} is not a valid host name" + (" (a wildcard must be a whole leading label: *.example.com)" if "*" in host else ""))
    return tuple(h.lower() for h in hosts)


def _build_virtual_service(doc: DocProblems, meta: m.Resource, spec: Mapping[str, Any]) -> m.VirtualService:
    hosts = spec.get("hosts") or []
    if not hosts:
        doc.error("spec.hosts", "at least one host is required (delegate VirtualServices are not supported)")
    gateways = spec.get("gateways") or ["mesh"]
    if "mesh" in gateways and "*" in hosts:
        doc.error(f"spec.hosts[{hosts.index('*')}]",
                  "wildcard host * is not allowed for virtual services bound to the mesh gateway")
    http = tuple(_http_route(doc, r, f"spec.http[{i}]") for i, r in enumerate(spec.get("http") or ()))
    return m.VirtualService(
        meta=meta,
        hosts=_hosts(doc, hosts, "spec.hosts", wildcard=True),
        gateways=tuple(spec.get("gateways") or ("mesh",)),
        http=http,
        export_to=tuple(spec.get("exportTo") or ()),
        tcp=tuple(_l4_route(doc, r, f"spec.tcp[{i}]", tls=False, hosts=hosts)
                  for i, r in enumerate(spec.get("tcp") or ())),
        tls=tuple(_l4_route(doc, r, f"spec.tls[{i}]", tls=True, hosts=hosts)
                  for i, r in enumerate(spec.get("tls") or ())),
        retry_grpc_trailers=held_bytes(doc, meta.annotations, http),
    )


def _subnet(doc: DocProblems, text: str, path: str) -> None:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        doc.error(path, f"{text!r} is not an IP address or CIDR block")


def _host_subset_of(name: str, host: str) -> bool:
    """Istio's host.Name.SubsetOf: `name` is `host`, or falls under its wildcard."""
    if host == "*":
        return True
    if host.startswith("*"):
        return name[1:].endswith(host[1:]) if name.startswith("*") else name.endswith(host[1:])
    return name == host


def _sni_host(doc: DocProblems, name: str, hosts: list[str], path: str) -> None:
    """Istio's validateSniHost: a host name (or, with a warning, an IP), within one of the VirtualService's hosts."""
    try:
        ipaddress.ip_address(name)
        doc.warn(path, f"using an IP address ({name!r}) goes against SNI spec and most clients do not support this")
        return
    except ValueError:
        pass
    if not _valid_host(name.removeprefix("*.")):
        doc.error(path, f"{name!r} is not a valid host name")
    elif not any(_host_subset_of(name, h.lower()) for h in hosts):
        doc.error(path, f"SNI host {name!r} is not a compatible subset of any of the virtual service hosts: "
                        f"[{', '.join(hosts)}]")


def _l4_route(doc: DocProblems, spec: Mapping[str, Any], path: str, *, tls: bool, hosts: list[str]) -> m.L4Route:
    """A `tcp:` or `tls:` route, checked as Istio's validateTCPRoute / validateTLSRoute."""
    matches = []
    for k, block in enumerate(spec.get("match") or ()):
        sub = f"{path}.match[{k}]"
        block = block or {}
        for j, subnet in enumerate(block.get("destinationSubnets") or ()):
            _subnet(doc, subnet, f"{sub}.destinationSubnets[{j}]")
        port = block.get("port")
        if port is not None and not 1 <= port <= 65535:
            doc.error(f"{sub}.port", f"{port} is not a valid port")
        sni = tuple(h.lower() for h in block.get("sniHosts") or ())
        if tls and not sni:
            doc.error(f"{sub}.sniHosts", "TLS match must have at least one SNI host")
        for j, name in enumerate(sni):
            _sni_host(doc, name, hosts, f"{sub}.sniHosts[{j}]")
        if block.get("sourceSubnet"):
            doc.warn(f"{sub}.sourceSubnet", "sourceSubnet is deprecated and not acted on by meshproxy: never matches")
        matches.append(m.L4MatchAttributes(
            destination_subnets=tuple(block.get("destinationSubnets") or ()), port=port,
            source_labels=dict(block.get("sourceLabels") or {}), source_namespace=block.get("sourceNamespace", ""),
            gateways=tuple(block.get("gateways") or ()), sni_hosts=sni, never=bool(block.get("sourceSubnet"))))
    if tls and not matches:
        doc.error(f"{path}.match", "TLS route must have at least one match condition")
    destinations = []
    for i, dest in enumerate(spec.get("route") or ()):
        sub = f"{path}.route[{i}]"
        weight = dest.get("weight", 0)
        if weight < 0:
            doc.error(f"{sub}.weight", "weight must not be negative")
        destinations.append(m.HTTPRouteDestination(
            destination=_destination(doc, dest.get("destination"), f"{sub}.destination"), weight=weight))
    if not destinations:
        doc.error(f"{path}.route", "route is required")
    elif len(destinations) > 1 and sum(d.weight for d in destinations) <= 0:
        doc.error(f"{path}.route", "total destination weight must be greater than 0")
    return m.L4Route(match=tuple(matches), route=tuple(destinations))


def _build_destination_rule(doc: DocProblems, meta: m.Resource, spec: Mapping[str, Any]) -> m.DestinationRule:
    host = spec.get("host", "")
    if not host:
        doc.error("spec.host", "host is required")
    else:
        _hosts(doc, [host], "spec.host", wildcard=True)
    policy = _traffic_policy(doc, spec.get("trafficPolicy"), "spec.trafficPolicy")
    subsets, seen = [], set()
    for i, subset in enumerate(spec.get("subsets") or ()):
        name = subset.get("name", "")
        if not name:
            doc.error(f"spec.subsets[{i}].name", "subset name is required")
        elif name in seen:
            doc.error(f"spec.subsets[{i}].name", f"duplicate subset name {name!r}")
        seen.add(name)
        subsets.append(m.Subset(name=name, labels=dict(subset.get("labels") or {}),
                                traffic_policy=_traffic_policy(doc, subset.get("trafficPolicy"),
                                                               f"spec.subsets[{i}].trafficPolicy")))
    return m.DestinationRule(meta=meta, host=host.lower(), subsets=tuple(subsets), traffic_policy=policy,
                             export_to=tuple(spec.get("exportTo") or ()))


# Proto enum values by number: proto JSON may write an enum as its number (the schema pass allows it).
LB_SIMPLE = ("UNSPECIFIED", "LEAST_CONN", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN", "LEAST_REQUEST")
TLS_MODES = ("DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL")


def _enum_name(value: Any, names: tuple[str, ...]) -> str:
    return names[value] if isinstance(value, int) else str(value)


NOT_IMPLEMENTED_POLICY = ("tunnel", "proxyProtocol")  # accepted as Istio does, warned about, not acted on


def _traffic_policy(doc: DocProblems, spec: Mapping[str, Any] | None, path: str) -> m.TrafficPolicy | None:
    if spec is None:
        return None
    ports = []
    for i, settings in enumerate(spec.get("portLevelSettings") or ()):
        sub = f"{path}.portLevelSettings[{i}]"
        ports.append(m.PortTrafficPolicy(
            port=(settings.get("port") or {}).get("number"),
            load_balancer=_load_balancer(settings.get("loadBalancer")),
            connection_pool=_connection_pool(settings.get("connectionPool")),
            outlier_detection=_outlier_detection(settings.get("outlierDetection")),
            tls=_client_tls(doc, settings.get("tls"), f"{sub}.tls"),
        ))
    for name in NOT_IMPLEMENTED_POLICY:
        if spec.get(name) is not None:
            doc.warn(f"{path}.{name}", f"{name} is not implemented: it is ignored")
    budget = spec.get("retryBudget")
    return m.TrafficPolicy(
        load_balancer=_load_balancer(spec.get("loadBalancer")),
        connection_pool=_connection_pool(spec.get("connectionPool")),
        outlier_detection=_outlier_detection(spec.get("outlierDetection")),
        tls=_client_tls(doc, spec.get("tls"), f"{path}.tls"),
        port_level_settings=tuple(ports),
        retry_budget=None if budget is None else m.RetryBudget(
            percent=float(budget["percent"]) if budget.get("percent") is not None else 20.0,
            min_retry_concurrency=int(budget.get("minRetryConcurrency", 3)),
        ),
    )


def _seconds(raw: str | None) -> float | None:
    return parse_duration(raw) if raw is not None else None


def _load_balancer(spec: Mapping[str, Any] | None) -> m.LoadBalancerSettings | None:
    if spec is None:
        return None
    ch, consistent = spec.get("consistentHash"), None
    if ch:
        cookie = ch.get("httpCookie")
        consistent = m.ConsistentHashLB(
            http_header_name=header_key(ch.get("httpHeaderName") or ""),
            http_cookie=m.HTTPCookie(str(cookie.get("name", "")), str(cookie.get("path", "")),
                                     _seconds(cookie.get("ttl"))) if cookie else None,
            use_source_ip=bool(ch.get("useSourceIp", False)),
            http_query_parameter_name=ch.get("httpQueryParameterName") or "",
            minimum_ring_size=int((ch.get("ringHash") or {}).get("minimumRingSize") or ch.get("minimumRingSize") or 0),
            maglev=ch.get("maglev") is not None,
            maglev_table_size=int((ch.get("maglev") or {}).get("tableSize") or 0),
        )
    return m.LoadBalancerSettings(simple=_enum_name(spec.get("simple") or "UNSPECIFIED", LB_SIMPLE),
                                  consistent_hash=consistent)


def _connection_pool(spec: Mapping[str, Any] | None) -> m.ConnectionPoolSettings | None:
    if spec is None:
        return None
    tcp, http = spec.get("tcp") or {}, spec.get("http") or {}
    return m.ConnectionPoolSettings(
        tcp=m.TCPSettings(max_connections=int(tcp.get("maxConnections") or 0),
                          connect_timeout=_seconds(tcp.get("connectTimeout"))),
        http=m.HTTPSettings(
            http1_max_pending_requests=int(http.get("http1MaxPendingRequests") or 0),
            http2_max_requests=int(http.get("http2MaxRequests") or 0),
            max_requests_per_connection=int(http.get("maxRequestsPerConnection") or 0),
            max_retries=int(http.get("maxRetries") or 0),
            idle_timeout=_seconds(http.get("idleTimeout")),
            h2_upgrade_policy=_enum_name(http.get("h2UpgradePolicy") or "DEFAULT", H2_UPGRADE_POLICIES),
            max_concurrent_streams=int(http.get("maxConcurrentStreams") or 0),
            use_client_protocol=bool(http.get("useClientProtocol")),
        ),
    )


def _outlier_detection(spec: Mapping[str, Any] | None) -> m.OutlierDetection | None:
    if spec is None:
        return None
    consecutive = spec.get("consecutive5xxErrors", spec.get("consecutiveErrors", 5))
    return m.OutlierDetection(
        consecutive_5xx_errors=int(consecutive if consecutive is not None else 5),
        consecutive_gateway_errors=int(spec.get("consecutiveGatewayErrors") or 0),
        interval=_seconds(spec.get("interval")),
        base_ejection_time=_seconds(spec.get("baseEjectionTime")),
        max_ejection_percent=float(spec.get("maxEjectionPercent", 10)),
        min_health_percent=float(spec.get("minHealthPercent", 0)),
    )


def _client_tls(doc: DocProblems, spec: Mapping[str, Any] | None, path: str) -> m.ClientTLSSettings | None:
    if spec is None:
        return None
    mode = _enum_name(spec.get("mode", "DISABLE"), TLS_MODES)
    # Istio's validation (validateTLS), and what meshproxy does not do yet: an error, never ignored silently.
    if spec.get("credentialName"):
        doc.error(f"{path}.credentialName", "credentialName (a Kubernetes secret) is not implemented: give the "
                                            "files with clientCertificate, privateKey and caCertificates")
    elif mode == "MUTUAL":
        for name, what in (("clientCertificate", "client certificate"), ("privateKey", "private key")):
            if not spec.get(name):
                doc.error(f"{path}.{name}", f"{what} required for mutual tls")
    if mode == "ISTIO_MUTUAL":
        for name in ("clientCertificate", "privateKey", "caCertificates", "caCrl"):
            if spec.get(name):
                doc.warn(f"{path}.{name}", "ignored with ISTIO_MUTUAL: the workload certificates (--cert-dir) "
                                           "and the mesh roots are used")
    return m.ClientTLSSettings(
        mode=mode,
        client_certificate=spec.get("clientCertificate", ""),
        private_key=spec.get("privateKey", ""),
        ca_certificates=spec.get("caCertificates", ""),
        credential_name=spec.get("credentialName", ""),
        subject_alt_names=tuple(spec.get("subjectAltNames") or ()),
        sni=spec.get("sni", ""),
        insecure_skip_verify=bool(spec.get("insecureSkipVerify", False)),
        ca_crl=spec.get("caCrl", ""),
    )


def _build_service_entry(doc: DocProblems, meta: m.Resource, spec: Mapping[str, Any]) -> m.ServiceEntry:
    hosts = spec.get("hosts") or []
    if not hosts:
        doc.error("spec.hosts", "at least one host is required")
    resolution = spec.get("resolution", "NONE")
    if isinstance(resolution, int):
        resolution = SE_RESOLUTIONS[resolution]
    ports, numbers, names = [], set(), set()
    for i, port in enumerate(spec.get("ports") or ()):
        sub = f"spec.ports[{i}]"
        number = port.get("number", 0)
        if not 1 <= number <= 65535:
            doc.error(f"{sub}.number", f"{number} is not a valid port")
        elif number in numbers:
            doc.error(f"{sub}.number", f"port number {number} is used twice")
        numbers.add(number)
        name, protocol = port.get("name", ""), port.get("protocol", "")
        if name and name in names:
            doc.error(f"{sub}.name", f"port name {name!r} is used twice")
        names.add(name)
        if protocol and protocol.upper() not in PORT_PROTOCOLS:
            doc.warn(f"{sub}.protocol", f"unknown protocol {protocol!r}: treated as TCP by Istio")
        ports.append(m.ServicePort(number=number, protocol=protocol.upper(), name=name, target_port=port.get("targetPort")))
    endpoints = []
    for i, ep in enumerate(spec.get("endpoints") or ()):
        sub = f"spec.endpoints[{i}]"
        address = ep.get("address", "")
        if not address:
            doc.error(f"{sub}.address", "endpoint address is required")
        elif resolution == "STATIC" and not address.startswith("unix://"):
            try:
                ipaddress.ip_address(address)
            except ValueError:
                doc.error(f"{sub}.address", f"{address!r} is not an IP address (required for STATIC resolution)")
        for port_name in ep.get("ports") or {}:
            if port_name not in names:
                doc.error(f"{sub}.ports.{port_name}", f"endpoint port {port_name!r} is not defined by the service entry")
        endpoints.append(m.WorkloadEntry(address=address, ports=dict(ep.get("ports") or {}),
                                         labels=dict(ep.get("labels") or {}), weight=ep.get("weight", 0),
                                         service_account=str(ep.get("serviceAccount") or "")))
    for i, address in enumerate(spec.get("addresses") or ()):
        _subnet(doc, address, f"spec.addresses[{i}]")
    if resolution == "STATIC" and not endpoints and not spec.get("workloadSelector"):
        doc.warn("spec.endpoints", "STATIC resolution with no endpoints: requests to these hosts get 503 no healthy upstream")
    if spec.get("workloadSelector"):
        doc.warn("spec.workloadSelector", "workloadSelector needs WorkloadEntries, which meshproxy does not read: use endpoints")
    return m.ServiceEntry(
        meta=meta,
        hosts=_hosts(doc, hosts, "spec.hosts", wildcard=True),
        addresses=tuple(spec.get("addresses") or ()),
        ports=tuple(ports),
        location=str(spec.get("location", "MESH_EXTERNAL")),
        resolution=str(resolution),
        endpoints=tuple(endpoints),
        subject_alt_names=tuple(spec.get("subjectAltNames") or ()),
    )


def _build_gateway(doc: DocProblems, meta: m.Resource, spec: Mapping[str, Any]) -> m.Gateway:
    from .build_gateway import build_gateway  # servers and their TLS (issue #16)

    return build_gateway(doc, meta, spec)


def _build_workload_entry(doc: DocProblems, meta: m.Resource, spec: Mapping[str, Any]) -> None:
    doc.warn("kind", "WorkloadEntry resources are not used by meshproxy: list endpoints in the ServiceEntry")
    return None


def _build_security(doc: DocProblems, meta: m.Resource, spec: Mapping[str, Any]) -> Any:
    """security.istio.io kinds: their builders load with the first such document (a proxy without is lighter)."""
    from . import build_security

    builder = {"AuthorizationPolicy": build_security.build_authorization_policy,
               "PeerAuthentication": build_security.build_peer_authentication,
               "RequestAuthentication": build_security.build_request_authentication}[meta.kind]
    return builder(doc, meta, spec)


BUILDERS: dict[str, Callable[[DocProblems, m.Resource, Mapping[str, Any]], Any]] = {
    "VirtualService": _build_virtual_service,
    "DestinationRule": _build_destination_rule,
    "ServiceEntry": _build_service_entry,
    "Gateway": _build_gateway,
    "WorkloadEntry": _build_workload_entry,
    "AuthorizationPolicy": _build_security,
    "PeerAuthentication": _build_security,
    "RequestAuthentication": _build_security,
}
