"""Command line: `meshproxy run | validate | routes | route | demo | iptables | inject | wait`.

Every `run` option also reads MESHPROXY_<NAME>."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .istio.problems import ConfigError
from .routing.policy import DEFAULT_RETRY_ATTEMPTS, DEFAULT_RETRY_ON

if TYPE_CHECKING:
    from .istio.load import LoadResult
from .settings import GatewayPortSpec, InboundSpec, InterceptSpec, Settings, parse_address
from .sidecar import commands as sidecar_commands


def _address(_: click.Context, __: click.Parameter, value: str | None) -> tuple[str, int] | None:
    if value is None or value in ("", "off", "none"):
        return None
    try:
        return parse_address(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _inbound(_: click.Context, __: click.Parameter, values: Sequence[str]) -> tuple[InboundSpec, ...]:
    try:
        return tuple(InboundSpec.parse(v) for item in values for v in item.split())
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _gateway_ports(_: click.Context, __: click.Parameter, values: Sequence[str]) -> tuple[GatewayPortSpec, ...]:
    try:
        return tuple(GatewayPortSpec.parse(v) for item in values for v in item.replace(",", " ").split())
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _labels(_: click.Context, __: click.Parameter, values: Sequence[str]) -> dict[str, str]:
    labels = {}
    for item in values:
        for pair in item.replace(",", " ").split():
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise click.BadParameter(f"{pair!r} is not key=value")
            labels[key] = value
    return labels


def _limit_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Downstream limits and timeouts of `run` (Settings fields of the same names)."""
    options = [
        click.option("--request-headers-timeout", type=float, default=10.0, show_default=True,
                     envvar="MESHPROXY_REQUEST_HEADERS_TIMEOUT",
                     help="Seconds a request head may take to arrive; then 408 and close (0: off)."),
        click.option("--idle-timeout", type=float, default=3600.0, show_default=True, envvar="MESHPROXY_IDLE_TIMEOUT",
                     help="Seconds an idle keep-alive client connection is kept (0: off)."),
        click.option("--stream-idle-timeout", type=float, default=300.0, show_default=True,
                     envvar="MESHPROXY_STREAM_IDLE_TIMEOUT",
                     help="Seconds without a byte either way on a request; then 408/504 (0: off)."),
        click.option("--max-connections", type=int, default=0, show_default=True, envvar="MESHPROXY_MAX_CONNECTIONS",
                     help="Client connections, shared out among --concurrency workers; more are closed at accept "
                          "(0: half the file limit of each process)."),
        click.option("--max-request-body", type=int, default=0, show_default=True, envvar="MESHPROXY_MAX_REQUEST_BODY",
                     help="Request body bytes; larger bodies get 413 (0: no limit)."),
        click.option("--max-request-headers-kb", type=click.IntRange(1, 8192), default=60, show_default=True,
                     envvar="MESHPROXY_MAX_REQUEST_HEADERS_KB", help="Request head size; larger gets 431."),
        click.option("--max-request-headers-count", type=click.IntRange(1, 10000), default=100, show_default=True,
                     envvar="MESHPROXY_MAX_REQUEST_HEADERS_COUNT", help="Request header lines; more gets 431."),
        click.option("--headers-with-underscores", default="reject", show_default=True,
                     envvar="MESHPROXY_HEADERS_WITH_UNDERSCORES", type=click.Choice(["allow", "drop", "reject"]),
                     help="Header names with '_': forward, drop the header, or answer 400."),
        click.option("--accept-http10", is_flag=True, envvar="MESHPROXY_ACCEPT_HTTP10",
                     help="Serve HTTP/1.0 requests (Istio's ISTIO_META_HTTP10); by default they get 426."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _telemetry_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Telemetry of `run` (Settings fields of the same names): Istio metrics, trace propagation, spans."""
    options = [
        click.option("--cluster-id", default="Kubernetes", show_default=True, envvar="MESHPROXY_CLUSTER_ID",
                     help="Istio CLUSTER_ID of this workload (source_cluster/destination_cluster labels)."),
        click.option("--metrics/--no-metrics", default=True, show_default=True, envvar="MESHPROXY_METRICS",
                     help="Istio standard metrics at /stats/prometheus (and the peer metadata headers they need)."),
        click.option("--tracing/--no-tracing", default=True, show_default=True, envvar="MESHPROXY_TRACING",
                     help="B3/W3C trace headers rewritten per hop and sampled spans exported (off: forwarded as is)."),
        click.option("--tracing-sampling", type=click.FloatRange(0, 100), default=1.0, show_default=True,
                     envvar="MESHPROXY_TRACING_SAMPLING",
                     help="Percent of new traces sampled; a decision in the request's headers wins."),
        click.option("--otlp-endpoint", default=None, envvar="MESHPROXY_OTLP_ENDPOINT",
                     help="OTLP/HTTP traces URL  [default: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, "
                          "OTEL_EXPORTER_OTLP_ENDPOINT, else http://127.0.0.1:4318/v1/traces]"),
        click.option("--console-requests", type=click.IntRange(0), default=0, show_default=True,
                     envvar="MESHPROXY_CONSOLE_REQUESTS",
                     help="Finished requests the admin's /console keeps in memory (0: off, nothing kept; "
                          "`meshproxy demo` keeps 200)."),
        click.option("--console-spans", type=click.IntRange(0), default=2000, show_default=True,
                     envvar="MESHPROXY_CONSOLE_SPANS",
                     help="Sampled spans the admin's /console keeps in memory besides the OTLP export (0: off)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _port_or_off(_: click.Context, __: click.Parameter, value: str | None) -> int | None:
    """A port number (0: a free one, as for the listeners), `off` (-1 here: off even with --transparent), or None
    when not given (the default)."""
    if value is None:
        return None
    if value in ("off", "none", ""):
        return -1
    if not value.isdigit() or not 0 <= int(value) <= 65535:
        raise click.BadParameter(f"{value!r} is not a port number or 'off'")
    return int(value)


def _listen_address(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, int]:
    address = _address(ctx, param, value)
    if address is None:
        raise click.BadParameter("an address is required (host:port)")
    return address


def _intercepts(_: click.Context, __: click.Parameter, values: Sequence[str]) -> tuple[InterceptSpec, ...]:
    try:
        return tuple(InterceptSpec.parse(v) for item in values for v in item.split())
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _interception_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Transparent interception and the mesh-wide settings of `run` (Settings fields of the same names)."""
    options = [
        click.option("--transparent", is_flag=True, envvar="MESHPROXY_TRANSPARENT",
                     help="Istio's sidecar listeners for traffic redirected by iptables: outbound and inbound, "
                          "each reading the connection's original destination (SO_ORIGINAL_DST); --listen is then "
                          "off unless given. Also pilot-agent's and Envoy's ports (--health-port 15021, --status-port "
                          "15020, --prometheus-port 15090) and its drain: listeners kept open, --min-drain-time 5."),
        click.option("--transparent-outbound", default="0.0.0.0:15001", show_default=True,
                     envvar="MESHPROXY_TRANSPARENT_OUTBOUND", callback=_listen_address,
                     help="The transparent outbound listener (the app's redirected connections)."),
        click.option("--transparent-inbound", default="0.0.0.0:15006", show_default=True,
                     envvar="MESHPROXY_TRANSPARENT_INBOUND", callback=_listen_address,
                     help="The transparent inbound listener: to the app at the original destination, from "
                          "127.0.0.6; with --cert-dir it terminates mutual TLS per original destination port as "
                          "PeerAuthentication says."),
        click.option("--tcp-listener", "tcp_listeners", multiple=True, envvar="MESHPROXY_TCP_LISTENERS",
                     callback=_intercepts,
                     help="LISTEN=ADDRESS:PORT: connections to LISTEN are handled as if redirected on their way to "
                          "ADDRESS:PORT (a ServiceEntry address and port), without iptables (repeatable)."),
        click.option("--outbound-traffic-policy", type=click.Choice(["ALLOW_ANY", "REGISTRY_ONLY"]),
                     default="ALLOW_ANY", show_default=True, envvar="MESHPROXY_OUTBOUND_TRAFFIC_POLICY",
                     help="Destinations outside the registry (meshConfig.outboundTrafficPolicy.mode): passed "
                          "through, or refused (HTTP 502 BlackHoleCluster, TCP closed)."),
        click.option("--protocol-detection-timeout", type=float, default=0.0, show_default=True,
                     envvar="MESHPROXY_PROTOCOL_DETECTION_TIMEOUT",
                     help="Seconds an undeclared port waits for the client's first bytes before proxying it as "
                          "TCP (meshConfig.protocolDetectionTimeout; 0: wait, as Istio's default)."),
        click.option("--tcp-idle-timeout", type=float, default=3600.0, show_default=True,
                     envvar="MESHPROXY_TCP_IDLE_TIMEOUT",
                     help="Seconds a proxied TCP connection may carry no byte either way (0: off)."),
        click.option("--mesh-config", type=click.Path(exists=True, dir_okay=False), default=None,
                     envvar="MESHPROXY_MESH_CONFIG",
                     help="Istio MeshConfig YAML (or the `istio` ConfigMap): outboundTrafficPolicy, "
                          "protocolDetectionTimeout, connectTimeout, accessLogFile/Encoding, "
                          "defaultConfig.terminationDrainDuration. Flags given explicitly win."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


# Settings field (a `run` option of the same name) -> the MeshConfig attribute that sets it unless the option is given
MESH_FIELDS = {
    "outbound_traffic_policy": "outbound_traffic_policy",
    "protocol_detection_timeout": "protocol_detection_timeout",
    "connect_timeout": "connect_timeout",
    "access_log_file": "access_log_file",
    "access_log": "access_log_encoding",
    "drain_time": "termination_drain_duration",
}


def _apply_mesh_config(path: str | None, values: dict[str, Any]) -> None:
    """Fill `values` (run's options by Settings name) from the mesh config where no flag was given."""
    if path is None:
        return
    from .istio.mesh import read_mesh_config

    try:
        mesh = read_mesh_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(str(problem), err=True)
        click.echo("meshproxy: mesh config rejected, not starting", err=True)
        sys.exit(2)
    ctx = click.get_current_context()
    for name, attribute in MESH_FIELDS.items():
        value = getattr(mesh, attribute)
        source = ctx.get_parameter_source(name)
        if value is None or source not in (click.core.ParameterSource.DEFAULT, None):
            continue
        if name == "access_log" and mesh.access_log_file is None:
            continue  # an encoding alone does not turn the log on (Istio: accessLogFile does)
        values[name] = value
    if mesh.access_log_file and ctx.get_parameter_source("access_log") == click.core.ParameterSource.DEFAULT \
            and values.get("access_log") == "off":
        values["access_log"] = "text"  # Istio's accessLogEncoding default


def _retry_on(_: click.Context, __: click.Parameter, value: str) -> str:
    from .istio.values import retry_on_problems  # the same rules as retryOn in a VirtualService

    problems = retry_on_problems(value)
    if problems:
        raise click.BadParameter("; ".join(problems))
    return value


def _load_or_exit(config: Sequence[str], code: int) -> LoadResult:
    """Load config for a read-only command; on errors print them and exit with `code`."""
    from .istio.load import load

    try:
        return load(config)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(str(problem), err=True)
        sys.exit(code)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="meshproxy")
def main() -> None:
    """meshproxy: a service-mesh sidecar that reads Istio's networking YAML."""


@main.command()
@click.option("--config", "-c", "config", multiple=True, type=click.Path(exists=True), envvar="MESHPROXY_CONFIG",
              help="Istio YAML file or folder (repeatable; hot-reloaded).")
@click.option("--listen", default="127.0.0.1:15001", show_default=True, envvar="MESHPROXY_LISTEN", callback=_address,
              help="Outbound listener for the local app's traffic ('off' to disable).")
@click.option("--inbound", multiple=True, envvar="MESHPROXY_INBOUND", callback=_inbound,
              help="Inbound listener LISTEN=APP, e.g. 127.0.0.1:15006=127.0.0.1:9080 (repeatable).")
@click.option("--admin", default="127.0.0.1:15000", show_default=True, envvar="MESHPROXY_ADMIN", callback=_address,
              help="Admin listener: /ready, /config_dump, /routes, /stats/prometheus, POST /reload, POST "
                   "/quitquitquit ('off' to disable).")
@click.option("--admin-allow-remote", is_flag=True, envvar="MESHPROXY_ADMIN_ALLOW_REMOTE",
              help="Allow a non-loopback admin address.")
@click.option("--workload", default="unknown", show_default=True, envvar="MESHPROXY_WORKLOAD",
              help="Workload name of the app beside this proxy.")
@click.option("--namespace", default="default", show_default=True, envvar="MESHPROXY_NAMESPACE",
              help="Namespace of the workload (expands short host names).")
@click.option("--label", "labels", multiple=True, envvar="MESHPROXY_LABELS", callback=_labels,
              help="Workload label key=value (repeatable, or comma-separated), for sourceLabels and telemetry.")
@click.option("--gateway", "gateways", multiple=True, envvar="MESHPROXY_GATEWAYS",
              help="Act as this gateway (name or namespace/name) instead of a sidecar ('mesh').")
@click.option("--gateway-port", "gateway_ports", multiple=True, envvar="MESHPROXY_GATEWAY_PORTS",
              callback=_gateway_ports,
              help="With --gateway: serve the Gateway servers of port NUMBER on [HOST:]PORT (repeatable), e.g. "
                   "443=127.0.0.1:8443: their hosts only, TLS as their `tls` says, httpsRedirect.")
@click.option("--credentials-dir", default=None, envvar="MESHPROXY_CREDENTIALS_DIR", type=click.Path(file_okay=False),
              help="A gateway server's `credentialName: NAME` is the folder DIR/NAME/ (tls.crt, tls.key, ca.crt, or "
                   "cert, key, cacert, as Istio's secrets), re-read when the files change.")
@click.option("--drain-time", default=5.0, show_default=True, type=float, envvar="MESHPROXY_DRAIN_TIME",
              help="Seconds the drain after SIGTERM may take (Istio's terminationDrainDuration); then what is left "
                   "is closed.")
@click.option("--min-drain-time", default=None, type=click.FloatRange(min=0), envvar="MESHPROXY_MIN_DRAIN_TIME",
              help="Seconds after SIGTERM before the proxy may exit early, once no connection is left (Istio's "
                   "MINIMUM_DRAIN_DURATION with EXIT_ON_ZERO_ACTIVE_CONNECTIONS)  [default: 5 with --transparent, "
                   "whose listeners keep accepting while it drains; else 0]")
@click.option("--status-port", default=None, envvar="MESHPROXY_STATUS_PORT", callback=_port_or_off,
              help="pilot-agent's status port on all addresses: /stats/prometheus, the proxy's metrics merged with the "
                   "app's (ISTIO_PROMETHEUS_ANNOTATIONS), and /healthz/ready ('off' to disable)  "
                   "[default: 15020 with --transparent, else off]")
@click.option("--health-port", default=None, envvar="MESHPROXY_HEALTH_PORT", callback=_port_or_off,
              help="The kubelet's readiness port on all addresses: /healthz/ready, 200 once the config is loaded and "
                   "every listener is up, 503 before and while draining ('off' to disable)  "
                   "[default: 15021 with --transparent, else off]")
@click.option("--prometheus-port", default=None, envvar="MESHPROXY_PROMETHEUS_PORT", callback=_port_or_off,
              help="Envoy's Prometheus port on all addresses: /stats/prometheus, the proxy's own metrics ('off' to "
                   "disable)  [default: 15090 with --transparent, else off]")
@click.option("--connect-timeout", default=10.0, show_default=True, type=float, envvar="MESHPROXY_CONNECT_TIMEOUT",
              help="Upstream TCP connect timeout in seconds.")
@click.option("--upstream-idle-timeout", default=4.0, show_default=True, type=float,
              envvar="MESHPROXY_UPSTREAM_IDLE_TIMEOUT", help="Seconds an idle upstream connection is kept.")
@click.option("--watch-interval", default=1.0, show_default=True, type=float, envvar="MESHPROXY_WATCH_INTERVAL",
              help="Seconds between config file checks (0: reload on SIGHUP or POST /reload only).")
@click.option("--seed", type=int, default=None, envvar="MESHPROXY_SEED", help="Seed for weighted picks and faults.")
@click.option("--concurrency", type=click.IntRange(0), default=1, show_default=True, envvar="MESHPROXY_CONCURRENCY",
              help="Worker processes, each a whole proxy, sharing the listen ports (SO_REUSEPORT), as Envoy's "
                   "--concurrency; the admin port answers for all of them (0: one per CPU).")
@click.option("--default-retry-attempts", type=click.IntRange(0), default=DEFAULT_RETRY_ATTEMPTS, show_default=True,
              envvar="MESHPROXY_DEFAULT_RETRY_ATTEMPTS",
              help="Retries of routes without `retries` (Istio's meshConfig.defaultHttpRetryPolicy; 0 disables).")
@click.option("--default-retry-on", default=DEFAULT_RETRY_ON,
              show_default=True, envvar="MESHPROXY_DEFAULT_RETRY_ON", callback=_retry_on,
              help="retryOn of routes without `retries` (Istio 1.24+ default: no 503).")
@click.option("--retry-reused-connection/--no-retry-reused-connection", default=True, show_default=True,
              envvar="MESHPROXY_RETRY_REUSED_CONNECTION",
              help="Send an idempotent request once more when the kept-alive upstream connection it reused is "
                   "reset, whatever the retry policy (as Go's HTTP client; Envoy does not: off for exact parity).")
@click.option("--jwks-refresh-interval", default=1200.0, show_default=True, type=click.FloatRange(min=0.1),
              envvar="MESHPROXY_JWKS_REFRESH_INTERVAL",
              help="Seconds between fetches of each RequestAuthentication jwksUri (istiod's default: 20 minutes).")
@_limit_options
@_telemetry_options
@_interception_options
@click.option("--access-log", default="off", show_default=True, envvar="MESHPROXY_ACCESS_LOG",
              type=click.Choice(["off", "text", "json"]), help="One line per request, Envoy/Istio format.")
@click.option("--access-log-file", default="/dev/stdout", show_default=True, envvar="MESHPROXY_ACCESS_LOG_FILE",
              help="Where access log lines go (Istio's meshConfig.accessLogFile); written in batches, off the "
                   "event loop.")
@click.option("--log-level", default="info", show_default=True, envvar="MESHPROXY_LOG_LEVEL",
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
@click.option("--cert-dir", default=None, envvar="MESHPROXY_CERT_DIR", type=click.Path(file_okay=False),
              help="Workload certificates (cert-chain.pem, key.pem, root-cert.pem, as pilot-agent writes them; "
                   "`meshproxy ca issue` makes them), re-read when they change: mutual TLS inbound and to "
                   "ISTIO_MUTUAL / auto mTLS upstreams.")
@click.option("--inbound-tls", default=None, envvar="MESHPROXY_INBOUND_TLS",
              type=click.Choice(["STRICT", "PERMISSIVE", "DISABLE"], case_sensitive=False),
              help="Inbound mutual TLS with --cert-dir, as PeerAuthentication's modes: STRICT (TLS only), "
                   "PERMISSIVE (TLS or plaintext, per connection), DISABLE; one mode for every inbound listener "
                   "and port instead of the PeerAuthentication's  [default: PeerAuthentication's, PERMISSIVE]")
def run(config: tuple[str, ...], listen: tuple[str, int] | None, inbound: tuple[InboundSpec, ...],
        admin: tuple[str, int] | None, admin_allow_remote: bool, workload: str, namespace: str,
        labels: dict[str, str], gateways: tuple[str, ...], drain_time: float, connect_timeout: float,
        upstream_idle_timeout: float, watch_interval: float, seed: int | None, concurrency: int,
        default_retry_attempts: int, default_retry_on: str, retry_reused_connection: bool, access_log: str,
        access_log_file: str, log_level: str, cert_dir: str | None, inbound_tls: str | None, **limits: Any) -> None:
    """Run the proxy: outbound and inbound listeners, admin, config hot reload."""
    from .app import run as run_app
    from .security.certs import CertError
    from .workers import resolve_concurrency, supervise

    _setup_logging(log_level)
    values = {"connect_timeout": connect_timeout, "drain_time": drain_time, "access_log": access_log,
              "access_log_file": access_log_file, **limits}
    _apply_mesh_config(values.pop("mesh_config"), values)
    if values["transparent"] and click.get_current_context().get_parameter_source("listen") == \
            click.core.ParameterSource.DEFAULT:
        listen = None  # the transparent outbound listener takes the app's traffic
    sidecar = values["transparent"]  # pilot-agent's ports and drain, as in a pod; standalone keeps its own
    for name, port in (("status_port", 15020), ("health_port", 15021), ("prometheus_port", 15090)):
        given = values[name]
        values[name] = (port if sidecar else None) if given is None else (None if given < 0 else given)
    if values["min_drain_time"] is None:
        values["min_drain_time"] = 5.0 if sidecar else 0.0
    settings = Settings(
        config=config, listen=listen, inbound=inbound, admin=admin, admin_allow_remote=admin_allow_remote,
        workload=workload, namespace=namespace, labels=labels,
        gateways=tuple(g for item in gateways for g in item.replace(",", " ").split()) or ("mesh",),
        log_level=log_level, upstream_idle_timeout=upstream_idle_timeout, watch_interval=watch_interval, seed=seed,
        default_retry_attempts=default_retry_attempts, default_retry_on=default_retry_on,
        retry_reused_connection=retry_reused_connection, cert_dir=cert_dir, inbound_tls=(inbound_tls or "").upper(),
        concurrency=resolve_concurrency(concurrency), **values,
    )
    if settings.gateway_ports and "mesh" in settings.gateways:
        raise click.BadParameter("serves a Gateway's ports: give --gateway NAME too", param_hint="--gateway-port")
    if settings.inbound_tls in ("STRICT", "PERMISSIVE") and not cert_dir:
        raise click.BadParameter(f"{settings.inbound_tls} needs the workload certificates: give --cert-dir",
                                 param_hint="--inbound-tls")
    try:
        sys.exit(supervise(settings) if settings.concurrency > 1 else run_app(settings))
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(str(problem), err=True)
        click.echo("meshproxy: configuration rejected, not starting", err=True)
        sys.exit(2)
    except CertError as exc:
        click.echo(f"meshproxy: certificates: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:
        click.echo(f"meshproxy: {exc}", err=True)
        sys.exit(1)
    except ValueError as exc:  # a non-loopback admin address without --admin-allow-remote
        click.echo(f"meshproxy: {exc}", err=True)
        sys.exit(2)


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--namespace", default="default", show_default=True, help="Namespace of the proxy (for short names).")
def validate(paths: tuple[str, ...], namespace: str) -> None:
    """Check Istio YAML as Istio would: errors (exit 1) and istioctl-analyze-style warnings."""
    from .istio.load import load
    from .routing.compile import Identity, compile_table

    _setup_logging("warning")
    try:
        result = load(paths)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(str(problem))
        errors = sum(p.severity == "error" for p in exc.problems)
        click.echo(f"invalid: {errors} error(s), {len(exc.problems) - errors} warning(s)")
        sys.exit(1)
    _, warnings = compile_table(result.snapshot, Identity(namespace=namespace))
    problems = result.warnings + warnings
    for problem in problems:
        click.echo(str(problem))
    snap = result.snapshot
    click.echo(
        f"valid: {len(snap.files)} file(s), {len(snap.virtual_services)} VirtualService, "
        f"{len(snap.destination_rules)} DestinationRule, {len(snap.service_entries)} ServiceEntry, "
        f"{len(snap.gateways)} Gateway; {len(problems)} warning(s)"
        + _security_summary(snap)
    )


def _security_summary(snap: Any) -> str:
    """The security resources read, when there are any (the line stays as it was without them)."""
    counts = [(len(snap.authorization_policies), "AuthorizationPolicy"),
              (len(snap.peer_authentications), "PeerAuthentication"),
              (len(snap.request_authentications), "RequestAuthentication")]
    if not any(n for n, _ in counts):
        return ""
    return "; security: " + ", ".join(f"{n} {kind}" for n, kind in counts)


@main.command()
@click.option("--config", "-c", "config", multiple=True, required=True, type=click.Path(exists=True))
@click.option("--namespace", default="default", show_default=True)
@click.option("--label", "labels", multiple=True, callback=_labels, help="Proxy workload label key=value.")
@click.option("--gateway", "gateways", multiple=True, help="Show the table of this gateway instead of a sidecar.")
def routes(config: tuple[str, ...], namespace: str, labels: dict[str, str], gateways: tuple[str, ...]) -> None:
    """Print the compiled route table (like `istioctl proxy-config routes`)."""
    from .routing.compile import Identity, compile_table
    from .routing.describe import describe_table

    _setup_logging("error")
    result = _load_or_exit(config, 1)
    table, _ = compile_table(result.snapshot, Identity(namespace=namespace, labels=labels, gateways=gateways or ("mesh",)))
    click.echo(describe_table(table), nl=False)


def _header_line(_: click.Context, __: click.Parameter, values: Sequence[str]) -> list[tuple[bytes, bytes]]:
    headers = []
    for item in values:
        name, sep, value = item.partition(":")
        if not sep or not name.strip() or name != name.strip():
            raise click.BadParameter(f"{item!r} is not 'name: value'")
        headers.append((name.lower().encode("latin-1"), value.strip().encode("latin-1")))
    return headers


@main.command("route")
@click.option("--config", "-c", "config", multiple=True, required=True, type=click.Path(exists=True))
@click.option("--header", "-H", "headers", multiple=True, callback=_header_line,
              help="Request header 'name: value' (repeatable; a name given twice sends two lines).")
@click.option("--method", "-X", "method", default="GET", show_default=True, help="Request method.")
@click.option("--namespace", default="default", show_default=True, help="Namespace of the proxy.")
@click.option("--label", "labels", multiple=True, callback=_labels, help="Proxy workload label key=value.")
@click.option("--gateway", "gateways", multiple=True, help="Route as this gateway instead of a sidecar.")
@click.argument("url")
def route(config: tuple[str, ...], headers: list[tuple[bytes, bytes]], method: str, namespace: str,
          labels: dict[str, str], gateways: tuple[str, ...], url: str) -> None:
    """Explain where a request to URL goes: the route that wins and why the earlier ones do not.

    URL is absolute (http://reviews:9080/reviews/0); the authority comes from it. Exit 0 when routed,
    1 when the request would get 404 NR.
    """
    from .routing.compile import Identity, compile_table
    from .which_route import which_route

    _setup_logging("error")
    result = _load_or_exit(config, 2)
    identity = Identity(namespace=namespace, labels=labels,
                        gateways=tuple(g for item in gateways for g in item.replace(",", " ").split()) or ("mesh",))
    table, _ = compile_table(result.snapshot, identity)
    try:
        answer = which_route(table, method, url, list(headers))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="URL") from None
    click.echo(f"request: {answer.request}")
    for line in answer.lines:
        click.echo(line)
    chosen = answer.chosen
    sys.exit(0 if chosen is not None else 1)


@main.group(invoke_without_command=True)
@click.option("--dir", "demo_dir", type=click.Path(path_type=Path), default=None, envvar="MESHPROXY_DEMO_DIR",
              help="State folder (routing files, logs)  [default: $TMPDIR/meshproxy-demo]")
@click.option("--port", default=9080, show_default=True, help="Ingress gateway port (the product page).")
@click.option("--base-port", default=19000, show_default=True, help="First of the ports used by apps and sidecars.")
@click.option("--access-log", default="text", show_default=True, type=click.Choice(["off", "text", "json"]),
              help="Access log of every proxy, in the logs folder.")
@click.pass_context
def demo(ctx: click.Context, demo_dir: Path | None, port: int, base_port: int, access_log: str) -> None:
    """Run Istio's Bookinfo on this machine: apps, sidecars, ingress. Ctrl-C stops it all."""
    from .demo.state import DEFAULT_DEMO_DIR

    ctx.obj = demo_dir or DEFAULT_DEMO_DIR
    if ctx.invoked_subcommand is None:
        from .demo.run import run_demo

        sys.exit(run_demo(ctx.obj, base_port, port, access_log))


def _demo_change(demo_dir: Path, files: tuple[str, ...], delete: bool) -> None:
    from .demo.state import change, config_dir

    if not config_dir(demo_dir).is_dir():
        raise click.ClickException(f"no demo state in {demo_dir}: start `meshproxy demo` first")
    try:
        for line in change(demo_dir, [Path(f) for f in files], delete=delete):
            click.echo(line)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(str(problem), err=True)
        raise click.ClickException("rejected: the running demo is unchanged") from None


@demo.command("apply")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True))
@click.pass_obj
def demo_apply(demo_dir: Path, files: tuple[str, ...]) -> None:
    """Apply Istio YAML to the running demo, as `kubectl apply -f`."""
    _demo_change(demo_dir, files, delete=False)


@demo.command("delete")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True))
@click.pass_obj
def demo_delete(demo_dir: Path, files: tuple[str, ...]) -> None:
    """Delete the resources of these files from the running demo, as `kubectl delete -f`."""
    _demo_change(demo_dir, files, delete=True)


main.add_command(sidecar_commands.iptables)
main.add_command(sidecar_commands.inject)
main.add_command(sidecar_commands.wait)


@main.group("ca")
def ca_group() -> None:
    """A mesh root CA and workload certificates (SPIFFE identities), as Istio's self-signed CA makes them."""


@ca_group.command("init")
@click.argument("ca_dir", type=click.Path(path_type=Path))
@click.option("--trust-domain", default="cluster.local", show_default=True, help="The mesh's SPIFFE trust domain.")
@click.option("--key-type", type=click.Choice(["rsa", "ec"]), default="rsa", show_default=True,
              help="RSA 2048 (Istio's default) or EC P-256.")
@click.option("--force", is_flag=True, help="Replace a CA already in CA_DIR.")
def ca_init(ca_dir: Path, trust_domain: str, key_type: str, force: bool) -> None:
    """Make a self-signed mesh root in CA_DIR: ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem."""
    from .security.ca import CAError, init_ca

    try:
        ca = init_ca(ca_dir, trust_domain, key_type, overwrite=force)
    except (CAError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"mesh root for trust domain {ca.trust_domain} in {ca_dir} (valid until "
               f"{ca.cert.not_valid_after_utc:%Y-%m-%d})")


@ca_group.command("issue")
@click.option("--ca", "ca_dir", required=True, type=click.Path(path_type=Path), help="A folder made by `ca init`.")
@click.option("--namespace", required=True, help="The workload's namespace.")
@click.option("--service-account", required=True, help="The workload's service account.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder to write cert-chain.pem, key.pem, root-cert.pem (pilot-agent's layout).")
@click.option("--ttl", default="24h", show_default=True, help="Lifetime (Istio's DEFAULT_WORKLOAD_CERT_TTL).")
@click.option("--key-type", type=click.Choice(["rsa", "ec"]), default="rsa", show_default=True)
@click.option("--trust-domain", default=None, help="Trust domain of the SPIFFE id  [default: the CA's]")
def ca_issue(ca_dir: Path, namespace: str, service_account: str, out: Path, ttl: str, key_type: str,
             trust_domain: str | None) -> None:
    """Issue a workload certificate for spiffe://<trust domain>/ns/NAMESPACE/sa/SERVICE_ACCOUNT into OUT."""
    from .security.ca import CAError, issue, load_ca, parse_ttl

    try:
        lifetime = parse_ttl(ttl)
        identity = issue(load_ca(ca_dir), namespace, service_account, out, lifetime, key_type, trust_domain)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    except CAError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{identity} in {out} (valid {ttl})")


if __name__ == "__main__":
    main()
