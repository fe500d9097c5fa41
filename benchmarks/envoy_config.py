"""Envoy's configuration for a scenario, translated from the same Istio YAML files meshproxy loads.

One source of truth: a scenario writes (or names) Istio YAML; meshproxy loads those files unchanged and this
module translates them into a static Envoy bootstrap the way istiod would for the outbound side of a sidecar,
for the subset of Istio the scenarios use:

- ServiceEntry (STATIC endpoints with labels) -> one cluster per (host, port), `outbound|PORT||HOST`, and one
  per DestinationRule subset, `outbound|PORT|SUBSET|HOST`, holding the endpoints whose labels match; a port whose
  protocol is HTTP2, GRPC or GRPC-WEB speaks HTTP/2 to its endpoints (`http2_protocol_options`, as istiod writes it);
- VirtualService `http` routes -> Envoy routes in the same order (first match wins in both), one per `match`
  entry (Istio ORs them), uri exact/prefix/regex and header exact/prefix/regex matches, one destination ->
  `cluster`, several -> `weighted_clusters` with the same weights;
- every route as istiod writes it by default: `timeout: 0s` (no timeout, as meshproxy) and the mesh's default
  retry policy (2 attempts on connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes:
  meshproxy's `--default-retry-*` defaults); clusters get istiod's circuit-breaker thresholds (none: every
  limit at 2^32-1) and its 10 s connect timeout; virtual host domains are the host's Kubernetes name forms
  with and without the port, as istiod lists them;
- telemetry on: HCM tracing with the Zipkin tracer (Istio's default tracer) with B3 and W3C propagation
  (`USE_B3_WITH_W3C_PROPAGATION`: meshproxy also rewrites both), 128-bit trace ids, random sampling at the
  scenario's percentage, spans exported as Zipkin JSON over HTTP to the harness's sink (meshproxy exports
  OTLP/HTTP to the same sink). Envoy always generates x-request-id. Istio's metrics (the `istio.stats` filter and the peer-metadata exchange) are
  not part of upstream Envoy, so Envoy has no equivalent of meshproxy's Istio metrics: with telemetry on,
  Envoy does less work than meshproxy (stated in the README).

- a DestinationRule's `trafficPolicy` (rule and subset level, the subset's fields winning as in Istio) with `tls:
  {mode: ISTIO_MUTUAL}` -> the cluster's UpstreamTlsContext as istiod writes it for a sidecar (the workload's
  certificate, the mesh roots, the ServiceEntry's `subjectAltNames` matched exactly, Istio's SNI
  `outbound_.PORT_.SUBSET_.HOST` and ALPN, TLS 1.2-1.3), given the certificate folder (`bootstrap(certs=...)`);
  `connectionPool.http.maxRequestsPerConnection` -> the cluster's `max_requests_per_connection`.

Anything else in the YAML (faults, retries, rewrites, mirrors, timeouts, other TLS modes, ...) raises
`Untranslatable`, so a scenario cannot silently give Envoy a different configuration than meshproxy's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

NAMESPACE = "default"
CLUSTER_DOMAIN = "svc.cluster.local"
MAX_THRESHOLD = 4294967295  # istiod's circuit breakers on every outbound cluster: no limit
DEFAULT_RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
DEFAULT_RETRY_ATTEMPTS = 2
CONNECT_TIMEOUT = "10s"
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
ZIPKIN = "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig"
SINK_CLUSTER = "trace-sink"
TLS_SOCKET = "envoy.transport_sockets.tls"
UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
HTTP_PROTOCOL_OPTIONS_NAME = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
HTTP_PROTOCOL_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
ISTIO_ALPN_HTTP11 = ["istio-http/1.1", "istio", "http/1.1"]  # what the istio_alpn filter offers for HTTP/1.1
ISTIO_TLS_PARAMS = {"tls_minimum_protocol_version": "TLSv1_2", "tls_maximum_protocol_version": "TLSv1_3"}
NODE_CLUSTER = "productpage.default"  # the service name Envoy gives its spans
HTTP2_PROTOCOLS = frozenset({"HTTP2", "GRPC", "GRPC-WEB"})  # Istio's protocol.IsHTTP2(): the cluster speaks HTTP/2

Json = dict[str, Any]


class Untranslatable(ValueError):
    """The Istio YAML uses something this translator does not render for Envoy."""


@dataclass(frozen=True, slots=True)
class Tracing:
    """Spans sampled at `percent` and exported (Zipkin JSON over HTTP) to `host:port` + `path`."""

    percent: float
    host: str
    port: int
    path: str


@dataclass(frozen=True, slots=True)
class CertDir:
    """A workload's certificates in pilot-agent's layout (`meshproxy ca issue --out DIR`)."""

    path: Path

    def tls_certificate(self) -> Json:
        return {"certificate_chain": {"filename": str(self.path / "cert-chain.pem")},
                "private_key": {"filename": str(self.path / "key.pem")}}

    def trusted_ca(self) -> Json:
        return {"filename": str(self.path / "root-cert.pem")}


@dataclass(frozen=True, slots=True)
class Policy:
    """The part of a DestinationRule trafficPolicy this translator renders."""

    istio_mutual: bool = False
    max_requests_per_connection: int = 0  # 0: unlimited


@dataclass(slots=True)
class Service:
    host: str  # fully qualified
    ports: dict[int, str]  # number -> name
    endpoints: list[tuple[str, dict[str, int], dict[str, str]]]  # address, port by name, labels
    subsets: dict[str, dict[str, str]] = field(default_factory=dict)  # DestinationRule subset -> labels
    subject_alt_names: list[str] = field(default_factory=list)  # the ServiceEntry's, for ISTIO_MUTUAL
    policies: dict[str, Policy] = field(default_factory=dict)  # "" (the rule's) or a subset -> its policy
    http2_ports: frozenset[int] = frozenset()  # ports whose protocol is HTTP/2 (HTTP2, GRPC, GRPC-WEB)


def fqdn(host: str, namespace: str = NAMESPACE) -> str:
    """A short Kubernetes name in `namespace` -> its cluster-local name; other names unchanged."""
    parts = host.split(".")
    if len(parts) == 1:
        return f"{host}.{namespace}.{CLUSTER_DOMAIN}"
    if len(parts) == 2:
        return f"{host}.{CLUSTER_DOMAIN}"
    return host


def domains(host: str, port: int) -> list[str]:
    """The names istiod lists for a service's virtual host: each shortening of the FQDN, with and without port."""
    names = [host]
    if host.endswith("." + CLUSTER_DOMAIN):
        name, namespace = host.split(".")[:2]
        names += [f"{name}.{namespace}.svc", f"{name}.{namespace}"]
        if namespace == NAMESPACE:
            names.append(name)
    return [form for name in names for form in (name, f"{name}:{port}")]


def cluster_name(port: int, subset: str, host: str) -> str:
    return f"outbound|{port}|{subset}|{host}"


def load_documents(files: Iterable[Path]) -> list[Json]:
    return [doc for path in files for doc in yaml.safe_load_all(path.read_text()) if doc]


def _check_keys(where: str, data: Mapping[str, Any], allowed: set[str]) -> None:
    extra = set(data) - allowed
    if extra:
        raise Untranslatable(f"{where}: {', '.join(sorted(extra))} not translated for Envoy")


def services_of(documents: Sequence[Json]) -> dict[str, Service]:
    services: dict[str, Service] = {}
    for doc in documents:
        if doc.get("kind") != "ServiceEntry":
            continue
        spec = doc["spec"]
        _check_keys("ServiceEntry", spec, {"hosts", "ports", "resolution", "endpoints", "location",
                                           "subjectAltNames"})
        if spec.get("resolution", "NONE") != "STATIC":
            raise Untranslatable("ServiceEntry: only resolution STATIC is translated")
        ports = {int(port["number"]): str(port["name"]) for port in spec["ports"]}
        http2_ports = frozenset(int(port["number"]) for port in spec["ports"]
                                if str(port.get("protocol", "")).upper() in HTTP2_PROTOCOLS)
        endpoints = [(str(ep["address"]), {str(k): int(v) for k, v in (ep.get("ports") or {}).items()},
                      {str(k): str(v) for k, v in (ep.get("labels") or {}).items()}) for ep in spec["endpoints"]]
        for host in spec["hosts"]:
            services[fqdn(host)] = Service(fqdn(host), ports, endpoints, http2_ports=http2_ports,
                                           subject_alt_names=[str(san) for san in spec.get("subjectAltNames") or []])
    for doc in documents:
        if doc.get("kind") != "DestinationRule":
            continue
        spec = doc["spec"]
        _check_keys("DestinationRule", spec, {"host", "subsets", "trafficPolicy"})
        service = services.get(fqdn(spec["host"]))
        if service is None:
            continue  # a rule for a service this scenario does not have (destination-rule-all.yaml has four)
        rule = traffic_policy(spec.get("trafficPolicy") or {}, Policy())
        service.policies[""] = rule
        for subset in spec.get("subsets") or []:
            _check_keys("DestinationRule subset", subset, {"name", "labels", "trafficPolicy"})
            service.subsets[str(subset["name"])] = {str(k): str(v) for k, v in subset["labels"].items()}
            service.policies[str(subset["name"])] = traffic_policy(subset.get("trafficPolicy") or {}, rule)
    return services


def traffic_policy(policy: Mapping[str, Any], inherited: Policy) -> Policy:
    """A trafficPolicy over the one it refines (a subset's over its rule's: each field it sets wins, as Istio)."""
    _check_keys("trafficPolicy", policy, {"tls", "connectionPool"})
    istio_mutual, max_requests = inherited.istio_mutual, inherited.max_requests_per_connection
    if "tls" in policy:
        _check_keys("trafficPolicy.tls", policy["tls"], {"mode"})
        mode = policy["tls"].get("mode", "DISABLE")
        if mode not in ("ISTIO_MUTUAL", "DISABLE"):
            raise Untranslatable(f"trafficPolicy.tls.mode {mode}: only ISTIO_MUTUAL and DISABLE are translated")
        istio_mutual = mode == "ISTIO_MUTUAL"
    if "connectionPool" in policy:
        pool = policy["connectionPool"]
        _check_keys("trafficPolicy.connectionPool", pool, {"http"})
        _check_keys("trafficPolicy.connectionPool.http", pool["http"], {"maxRequestsPerConnection"})
        max_requests = int(pool["http"].get("maxRequestsPerConnection") or 0)
    return Policy(istio_mutual, max_requests)


def istio_mutual_tls(certs: CertDir, port: int, subset: str, service: Service) -> Json:
    """The UpstreamTlsContext istiod writes for an ISTIO_MUTUAL cluster of a sidecar."""
    validation: Json = {"trusted_ca": certs.trusted_ca()}
    if service.subject_alt_names:
        validation["match_typed_subject_alt_names"] = [{"san_type": "URI", "matcher": {"exact": san}}
                                                       for san in service.subject_alt_names]
    return {"name": TLS_SOCKET, "typed_config": {
        "@type": UPSTREAM_TLS,
        "sni": f"outbound_.{port}_.{subset}_.{service.host}",  # Istio's: the cluster name, '|' -> '_.'
        "common_tls_context": {"tls_params": ISTIO_TLS_PARAMS, "alpn_protocols": ISTIO_ALPN_HTTP11,
                               "tls_certificates": [certs.tls_certificate()], "validation_context": validation},
    }}


def clusters_of(services: Mapping[str, Service], certs: CertDir | None = None) -> list[Json]:
    clusters = []
    for service in services.values():
        for number, port_name in service.ports.items():
            for subset, labels in [("", {}), *service.subsets.items()]:
                endpoints = [
                    {"endpoint": {"address": {"socket_address": {"address": address,
                                                                 "port_value": ports.get(port_name, number)}}}}
                    for address, ports, endpoint_labels in service.endpoints
                    if all(endpoint_labels.get(key) == value for key, value in labels.items())
                ]
                name = cluster_name(number, subset, service.host)
                cluster = static_cluster(name, endpoints)
                policy = service.policies.get(subset) or service.policies.get("") or Policy()
                if policy.istio_mutual:
                    if certs is None:
                        raise Untranslatable(f"{name}: ISTIO_MUTUAL needs the workload's certificates (certs=)")
                    cluster["transport_socket"] = istio_mutual_tls(certs, number, subset, service)
                http2 = number in service.http2_ports  # as istiod writes an HTTP/2 port's cluster
                if policy.max_requests_per_connection or http2:
                    options: Json = {"@type": HTTP_PROTOCOL_OPTIONS, "explicit_http_config": {
                        "http2_protocol_options" if http2 else "http_protocol_options": {}}}
                    if policy.max_requests_per_connection:
                        options["common_http_protocol_options"] = {
                            "max_requests_per_connection": policy.max_requests_per_connection}
                    cluster["typed_extension_protocol_options"] = {HTTP_PROTOCOL_OPTIONS_NAME: options}
                clusters.append(cluster)
    return clusters


def static_cluster(name: str, lb_endpoints: list[Json]) -> Json:
    limit = MAX_THRESHOLD
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": CONNECT_TIMEOUT,
        "lb_policy": "LEAST_REQUEST",  # istiod's default load balancer
        "circuit_breakers": {"thresholds": [{"max_connections": limit, "max_pending_requests": limit,
                                             "max_requests": limit, "max_retries": limit}]},
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": lb_endpoints}]},
    }


def string_match(where: str, match: Mapping[str, Any]) -> Json:
    _check_keys(where, match, {"exact", "prefix", "regex"})
    if len(match) != 1:
        raise Untranslatable(f"{where}: one of exact, prefix, regex expected")
    kind, value = next(iter(match.items()))
    return {"safe_regex": {"regex": value}} if kind == "regex" else {kind: value}


def route_match(match: Mapping[str, Any]) -> Json:
    _check_keys("VirtualService match", match, {"uri", "headers", "name"})
    result: Json = {"prefix": "/"}
    if "uri" in match:
        uri = string_match("uri match", match["uri"])
        result = {"path": uri["exact"]} if "exact" in uri else uri
    if "headers" in match:
        result["headers"] = [{"name": name, "string_match": string_match("header match", value)}
                             for name, value in match["headers"].items()]
    return result


def route_action(http: Mapping[str, Any], services: Mapping[str, Service]) -> Json:
    destinations = []
    for entry in http["route"]:
        _check_keys("VirtualService route", entry, {"destination", "weight"})
        destination = entry["destination"]
        _check_keys("destination", destination, {"host", "subset", "port"})
        service = services.get(fqdn(destination["host"]))
        if service is None:
            raise Untranslatable(f"destination {destination['host']}: no ServiceEntry")
        port = int(destination["port"]["number"]) if "port" in destination else next(iter(service.ports))
        destinations.append((cluster_name(port, destination.get("subset", ""), service.host),
                             int(entry.get("weight", 100 if len(http["route"]) == 1 else 0))))
    action: Json = {"timeout": "0s", "retry_policy": {
        "retry_on": DEFAULT_RETRY_ON, "num_retries": DEFAULT_RETRY_ATTEMPTS,
        "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
        "host_selection_retry_max_attempts": "5"}}
    if len(destinations) == 1:
        action["cluster"] = destinations[0][0]
    else:
        action["weighted_clusters"] = {"clusters": [{"name": name, "weight": weight}
                                                    for name, weight in destinations if weight]}
    return action


def virtual_hosts_of(documents: Sequence[Json], services: Mapping[str, Service]) -> list[Json]:
    routes_by_host: dict[str, list[Json]] = {}
    for doc in documents:
        if doc.get("kind") != "VirtualService":
            continue
        spec = doc["spec"]
        _check_keys("VirtualService", spec, {"hosts", "http"})
        routes: list[Json] = []
        for http in spec.get("http") or []:
            _check_keys("VirtualService http", http, {"match", "route", "name"})
            action = route_action(http, services)
            routes += [{"match": route_match(match), "route": action} for match in http.get("match") or [{}]]
        for host in spec["hosts"]:
            routes_by_host[fqdn(host)] = routes
    virtual_hosts = []
    for service in services.values():
        for number in service.ports:
            default = [{"match": {"prefix": "/"}, "route": {"cluster": cluster_name(number, "", service.host),
                                                             "timeout": "0s"}}]
            virtual_hosts.append({"name": f"{service.host}:{number}", "domains": domains(service.host, number),
                                  "routes": routes_by_host.get(service.host, default)})
    return virtual_hosts


def socket_address(host: str, port: int) -> Json:
    return {"socket_address": {"address": host, "port_value": port}}


def bootstrap(files: Iterable[Path], *, listen: tuple[str, int], admin: tuple[str, int],
              tracing: Tracing | None = None, certs: CertDir | None = None) -> Json:
    """The whole static bootstrap: one outbound listener on `listen`, admin on `admin`; `certs`: the workload's
    certificates, for ISTIO_MUTUAL clusters."""
    documents = load_documents(files)
    services = services_of(documents)
    clusters = clusters_of(services, certs)
    manager: Json = {
        "@type": HCM,
        "stat_prefix": "outbound",
        "route_config": {"name": "outbound", "virtual_hosts": virtual_hosts_of(documents, services)},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}],
        # as istiod writes the outbound HCM (no access log: meshproxy's is off in every scenario)
        "use_remote_address": False,
        "normalize_path": True,
        "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
        "common_http_protocol_options": {"idle_timeout": "3600s"},
    }
    if tracing is not None:
        manager["tracing"] = {
            "random_sampling": {"value": tracing.percent},
            "provider": {"name": "envoy.tracers.zipkin", "typed_config": {
                "@type": ZIPKIN,
                "collector_cluster": SINK_CLUSTER,
                "collector_endpoint": tracing.path,
                "collector_endpoint_version": "HTTP_JSON",
                "trace_id_128bit": True,
                "shared_span_context": False,
                "trace_context_option": "USE_B3_WITH_W3C_PROPAGATION",
            }},
        }
        clusters.append({"name": SINK_CLUSTER, "type": "STATIC", "connect_timeout": "1s",
                         "load_assignment": {"cluster_name": SINK_CLUSTER, "endpoints": [{"lb_endpoints": [
                             {"endpoint": {"address": socket_address(tracing.host, tracing.port)}}]}]}})
    return {
        "node": {"id": f"sidecar~127.0.0.1~productpage-v1.{NAMESPACE}~{NAMESPACE}.{CLUSTER_DOMAIN}",
                 "cluster": NODE_CLUSTER},
        "admin": {"address": socket_address(*admin)},
        "static_resources": {
            "listeners": [{
                "name": "outbound",
                "address": socket_address(*listen),
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                "typed_config": manager}]}],
            }],
            "clusters": clusters,
        },
    }


class _NoAliases(yaml.SafeDumper):
    """Routes share one action dict; write it out in full each time rather than as a YAML alias."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def write(path: Path, config: Json) -> None:
    path.write_text(yaml.dump(config, Dumper=_NoAliases, sort_keys=False, width=120))
