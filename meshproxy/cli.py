"""Command line: `meshproxy run | validate | routes | demo`. Every `run` option also reads MESHPROXY_<NAME>."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import click

from .istio.problems import ConfigError
from .settings import InboundSpec, Settings, parse_address


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


def _labels(_: click.Context, __: click.Parameter, values: Sequence[str]) -> dict[str, str]:
    labels = {}
    for item in values:
        for pair in item.replace(",", " ").split():
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise click.BadParameter(f"{pair!r} is not key=value")
            labels[key] = value
    return labels


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
              help="Admin listener: /ready, /config_dump, /routes, /stats/prometheus ('off' to disable).")
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
@click.option("--drain-time", default=5.0, show_default=True, type=float, envvar="MESHPROXY_DRAIN_TIME",
              help="Seconds in-flight requests get to finish after SIGTERM.")
@click.option("--connect-timeout", default=10.0, show_default=True, type=float, envvar="MESHPROXY_CONNECT_TIMEOUT",
              help="Upstream TCP connect timeout in seconds.")
@click.option("--upstream-idle-timeout", default=4.0, show_default=True, type=float,
              envvar="MESHPROXY_UPSTREAM_IDLE_TIMEOUT", help="Seconds an idle upstream connection is kept.")
@click.option("--watch-interval", default=1.0, show_default=True, type=float, envvar="MESHPROXY_WATCH_INTERVAL",
              help="Seconds between config file checks (0: reload on SIGHUP only).")
@click.option("--seed", type=int, default=None, envvar="MESHPROXY_SEED", help="Seed for weighted picks and faults.")
@click.option("--access-log", default="off", show_default=True, envvar="MESHPROXY_ACCESS_LOG",
              type=click.Choice(["off", "text", "json"]), help="One line per request to stdout, Envoy format.")
@click.option("--log-level", default="info", show_default=True, envvar="MESHPROXY_LOG_LEVEL",
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
def run(config: tuple[str, ...], listen: tuple[str, int] | None, inbound: tuple[InboundSpec, ...],
        admin: tuple[str, int] | None, admin_allow_remote: bool, workload: str, namespace: str,
        labels: dict[str, str], gateways: tuple[str, ...], drain_time: float, connect_timeout: float,
        upstream_idle_timeout: float, watch_interval: float, seed: int | None, access_log: str,
        log_level: str) -> None:
    """Run the proxy: outbound and inbound listeners, admin, config hot reload."""
    from .app import run as run_app

    _setup_logging(log_level)
    settings = Settings(
        config=config, listen=listen, inbound=inbound, admin=admin, admin_allow_remote=admin_allow_remote,
        workload=workload, namespace=namespace, labels=labels,
        gateways=tuple(g for item in gateways for g in item.replace(",", " ").split()) or ("mesh",),
        log_level=log_level, access_log=access_log, drain_time=drain_time, connect_timeout=connect_timeout,
        upstream_idle_timeout=upstream_idle_timeout, watch_interval=watch_interval, seed=seed,
    )
    try:
        sys.exit(run_app(settings))
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(str(problem), err=True)
        click.echo("meshproxy: configuration rejected, not starting", err=True)
        sys.exit(2)
    except OSError as exc:
        click.echo(f"meshproxy: {exc}", err=True)
        sys.exit(1)


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
    )


@main.command()
@click.option("--config", "-c", "config", multiple=True, required=True, type=click.Path(exists=True))
@click.option("--namespace", default="default", show_default=True)
@click.option("--label", "labels", multiple=True, callback=_labels, help="Proxy workload label key=value.")
@click.option("--gateway", "gateways", multiple=True, help="Show the table of this gateway instead of a sidecar.")
def routes(config: tuple[str, ...], namespace: str, labels: dict[str, str], gateways: tuple[str, ...]) -> None:
    """Print the compiled route table (like `istioctl proxy-config routes`)."""
    from .istio.load import load
    from .routing.compile import Identity, compile_table
    from .routing.describe import describe_table

    _setup_logging("error")
    try:
        result = load(config)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(str(problem), err=True)
        sys.exit(1)
    table, _ = compile_table(result.snapshot, Identity(namespace=namespace, labels=labels, gateways=gateways or ("mesh",)))
    click.echo(describe_table(table), nl=False)


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


if __name__ == "__main__":
    main()
