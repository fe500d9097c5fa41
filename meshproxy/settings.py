"""Settings: one frozen object, built by the CLI (flags or MESHPROXY_* environment variables)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .routing.policy import DEFAULT_RETRY_ATTEMPTS, DEFAULT_RETRY_ON


def parse_address(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """`host:port`, `:port` or `[v6]:port` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{text!r} is not host:port")
    host = host.strip("[]") or default_host
    number = int(port)
    if not 0 <= number <= 65535:
        raise ValueError(f"{text!r}: port out of range")
    return host, number


def _address_pair(text: str, form: str) -> tuple[tuple[str, int], tuple[str, int]]:
    """`HOST:PORT=HOST:PORT` -> both addresses; ValueError naming the expected `form`."""
    left, sep, right = text.partition("=")
    if not sep:
        raise ValueError(f"{text!r} is not {form}")
    return parse_address(left), parse_address(right)


@dataclass(frozen=True, slots=True)
class InboundSpec:
    """`LISTEN=APP`: traffic arriving at LISTEN is for the local app at APP."""

    listen: tuple[str, int]
    app: tuple[str, int]

    @classmethod
    def parse(cls, text: str) -> InboundSpec:
        return cls(*_address_pair(text, "LISTEN=APP (e.g. 127.0.0.1:15006=127.0.0.1:9080)"))


@dataclass(frozen=True, slots=True)
class InterceptSpec:
    """`LISTEN=DESTINATION`: connections to LISTEN are handled as if redirected on their way to DESTINATION
    (a ServiceEntry address and port): a transparent listener without iptables (`--tcp-listener`)."""

    listen: tuple[str, int]
    destination: tuple[str, int]

    @classmethod
    def parse(cls, text: str) -> InterceptSpec:
        return cls(*_address_pair(text, "LISTEN=ADDRESS:PORT (e.g. 127.0.0.1:13306=10.0.0.5:3306)"))


@dataclass(frozen=True, slots=True)
class GatewayPortSpec:
    """`NUMBER=[HOST:]PORT`: the Gateway servers of port NUMBER are served on HOST:PORT (`--gateway-port`), as a
    Kubernetes Service maps a gateway's port 443 to its pod's 8443."""

    number: int
    listen: tuple[str, int]

    @classmethod
    def parse(cls, text: str) -> GatewayPortSpec:
        number, sep, listen = text.partition("=")
        if not sep or not number.strip().isdigit() or not 0 < int(number) < 65536:
            raise ValueError(f"{text!r} is not NUMBER=[HOST:]PORT (e.g. 443=127.0.0.1:8443)")
        listen = listen.strip()
        return cls(int(number), parse_address(listen if ":" in listen else f":{listen}"))


@dataclass(frozen=True, slots=True)
class Settings:
    config: tuple[str, ...] = ()
    listen: tuple[str, int] | None = ("127.0.0.1", 15001)  # outbound; None disables it
    inbound: tuple[InboundSpec, ...] = ()
    admin: tuple[str, int] | None = ("127.0.0.1", 15000)
    admin_allow_remote: bool = False
    workload: str = "unknown"
    namespace: str = "default"
    labels: Mapping[str, str] = field(default_factory=dict)
    gateways: tuple[str, ...] = ("mesh",)
    log_level: str = "info"
    access_log: str = "off"  # off | text | json
    access_log_file: str = "/dev/stdout"  # Istio's meshConfig.accessLogFile default
    drain_time: float = 5.0  # Istio terminationDrainDuration
    # Istio's MINIMUM_DRAIN_DURATION (with EXIT_ON_ZERO_ACTIVE_CONNECTIONS): no exit before it, even with no
    # connection left (the CLI gives 5 s with --transparent, 0 without); capped at drain_time.
    min_drain_time: float = 0.0
    connect_timeout: float = 10.0  # Istio's mesh connectTimeout default
    upstream_idle_timeout: float = 4.0  # below common app keep-alives (Node 5 s), so the proxy closes first
    watch_interval: float = 1.0  # seconds between config file checks; 0 disables (SIGHUP still reloads)
    seed: int | None = None  # fixed seed for weights and faults (tests); None = random
    # Mesh-wide retry policy of routes without `retries` (meshConfig.defaultHttpRetryPolicy).
    default_retry_attempts: int = DEFAULT_RETRY_ATTEMPTS
    default_retry_on: str = DEFAULT_RETRY_ON
    # One free retry of an idempotent request whose reused keep-alive connection was reset (as Go's HTTP client;
    # Envoy does not): False for exact Envoy parity.
    retry_reused_connection: bool = True
    # Downstream limits and timeouts (Envoy's names and defaults; see proxy/listener.py). 0 disables a timeout.
    request_headers_timeout: float = 10.0  # a request head must arrive within this -> else 408 and close
    idle_timeout: float = 3600.0  # keep-alive connection with no request in progress
    stream_idle_timeout: float = 300.0  # no byte either way on an active request -> 408 / 504 (SI)
    max_connections: int = 0  # downstream connections of the process; 0: half the open-file limit (<= 50 000)
    max_request_body: int = 0  # bytes; larger bodies get 413; 0: no limit
    max_request_headers_kb: int = 60  # request-target + header names and values -> else 431
    max_request_headers_count: int = 100  # header lines -> else 431
    headers_with_underscores: str = "reject"  # allow | drop | reject (Envoy's edge advice)
    accept_http10: bool = False  # HTTP/1.0 requests get 426 unless enabled, as Istio's sidecars
    # Telemetry (see meshproxy/telemetry/): Istio metrics, B3/W3C propagation and OTLP spans.
    cluster_id: str = "Kubernetes"  # Istio's CLUSTER_ID: the source_cluster / destination_cluster label
    metrics: bool = True  # Istio standard metrics at /stats/prometheus, with the peer metadata exchange
    tracing: bool = True  # rewrite trace headers per hop and record sampled spans; off: forward them unchanged
    tracing_sampling: float = 1.0  # percent of new traces sampled (Istio's default); incoming decisions win
    # The console (meshproxy/console/): the last N finished requests and spans kept in memory; 0 turns each off.
    console_requests: int = 0  # off by default: the record of each request costs ~3 % of its instructions
    console_spans: int = 2000
    otlp_endpoint: str | None = None  # None: OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, else 127.0.0.1:4318/v1/traces
    # Worker processes (see meshproxy/workers.py): 1 is one process; N > 1 is a supervisor and N workers whose
    # listeners share their ports with SO_REUSEPORT. `worker_index` is set only in a worker's own Settings.
    concurrency: int = 1
    worker_index: int | None = None
    # RequestAuthentication: how often the keys of each jwksUri are fetched again (istiod's default, 20 minutes).
    jwks_refresh_interval: float = 1200.0
    # Transparent interception (proxy/transparent.py), as Istio's sidecar behind istio-iptables.
    transparent: bool = False  # listen on transparent_outbound and transparent_inbound
    transparent_outbound: tuple[str, int] = ("0.0.0.0", 15001)
    transparent_inbound: tuple[str, int] = ("0.0.0.0", 15006)
    tcp_listeners: tuple[InterceptSpec, ...] = ()  # fixed original destination, no iptables
    # Mesh-wide (Istio's meshConfig; `--mesh-config` reads them from Istio's YAML, istio/mesh.py).
    outbound_traffic_policy: str = "ALLOW_ANY"  # ALLOW_ANY | REGISTRY_ONLY
    protocol_detection_timeout: float = 0.0  # seconds an undeclared port waits for client bytes; 0: no timeout
    tcp_idle_timeout: float = 3600.0  # Istio's tcp_proxy idle_timeout (1 h)
    # Workload certificates (security/certs.py): a folder in pilot-agent's layout, polled for rotation. With it,
    # inbound listeners take mutual TLS in `inbound_tls` mode (STRICT, PERMISSIVE or DISABLE; "": PERMISSIVE,
    # Istio's default) and ISTIO_MUTUAL / auto mTLS work upstream. Without it, everything stays plaintext.
    cert_dir: str | None = None
    inbound_tls: str = ""
    cert_poll_interval: float = 1.0
    # Gateway ports (gateway.py): each Gateway server port with a listener, and credentialName's folders.
    gateway_ports: tuple[GatewayPortSpec, ...] = ()
    credentials_dir: str | None = None
    # pilot-agent's ports (status_ports.py), on all addresses; None: off. The CLI turns them on with --transparent.
    status_port: int | None = None  # /stats/prometheus: the proxy's metrics merged with the app's (15020)
    health_port: int | None = None  # /healthz/ready: the kubelet's readiness probe (15021)
    prometheus_port: int | None = None  # /stats/prometheus: the proxy's own metrics, as Envoy's 15090

    @property
    def pod_ports(self) -> tuple[int | None, int | None, int | None]:
        """(health, status, prometheus): pilot-agent's and Envoy's ports, as StatusPorts.start takes them."""
        return self.health_port, self.status_port, self.prometheus_port
