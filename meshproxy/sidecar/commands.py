"""`meshproxy iptables` and `meshproxy inject`: the click commands (cli.py adds them to the group)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import click

from .iptables import DEFAULT_INBOUND_PORTS_EXCLUDE, CaptureConfig, CaptureConfigError, split


def capture_config(params: dict[str, Any]) -> CaptureConfig:
    """The parsed options of `meshproxy iptables` -> CaptureConfig (also used to read an init container's args)."""
    if params["inbound_interception_mode"] != "REDIRECT":
        raise CaptureConfigError("--inbound-interception-mode: only REDIRECT is supported (meshproxy's inbound "
                                 "listener does not bind transparently, which TPROXY needs)")
    uids = split(params["proxy_uid"])
    gids = split(params["proxy_gid"]) if params["proxy_gid"] is not None else uids
    ipv6 = params["ipv6"]
    if ipv6 is None:
        from .netfilter import detect_ipv6

        ipv6 = detect_ipv6(params["dual_stack"])
    return CaptureConfig(
        proxy_port=params["envoy_port"], inbound_capture_port=params["inbound_capture_port"],
        inbound_tunnel_port=params["inbound_tunnel_port"], proxy_uids=uids, proxy_gids=gids,
        inbound_ports_include=params["inbound_ports"].strip(),
        inbound_ports_exclude=split(params["inbound_ports_exclude"]),
        outbound_ports_include=split(params["outbound_ports"]),
        outbound_ports_exclude=split(params["outbound_ports_exclude"]),
        outbound_ip_ranges_include=params["outbound_ip_ranges"].strip(),
        outbound_ip_ranges_exclude=params["outbound_ip_ranges_exclude"].strip(),
        reroute_virtual_interfaces=split(params["kube_virt_interfaces"]),
        exclude_interfaces=split(params["exclude_interfaces"]),
        owner_groups_include=params["outbound_owner_groups"].strip(),
        owner_groups_exclude=split(params["outbound_owner_groups_exclude"]),
        host_ipv4_loopback_cidr=params["host_ipv4_loopback_cidr"], drop_invalid=params["drop_invalid"], ipv6=ipv6)


def parse_iptables_args(args: Sequence[str]) -> CaptureConfig:
    """`meshproxy iptables ARGS` parsed exactly as the command line parses them (the injector's tests use it)."""
    context = iptables.make_context("iptables", list(args))
    return capture_config(context.params)


@click.command("iptables")
@click.option("-p", "--envoy-port", "envoy_port", default="15001", show_default=True,
              help="Port that outbound TCP traffic is redirected to (the outbound listener).")
@click.option("-z", "--inbound-capture-port", default="15006", show_default=True,
              help="Port that inbound TCP traffic is redirected to (the inbound listener).")
@click.option("-e", "--inbound-tunnel-port", default="15008", show_default=True,
              help="Istio's HBONE tunnel port, never captured inbound.")
@click.option("-u", "--proxy-uid", default="1337", show_default=True,
              help="UID(s) of the proxy, comma-separated: its own traffic is never redirected.")
@click.option("-g", "--proxy-gid", default=None, help="GID(s) of the proxy  [default: the --proxy-uid values]")
@click.option("-m", "--inbound-interception-mode", "--istio-inbound-interception-mode", "inbound_interception_mode",
              default="REDIRECT", show_default=True, help="Only REDIRECT (TPROXY is not supported).")
@click.option("-b", "--inbound-ports", "--istio-inbound-ports", "inbound_ports", default="*", show_default=True,
              help="Inbound ports to capture, comma-separated; '*' all, '' none.")
@click.option("-d", "--inbound-ports-exclude", "--istio-local-exclude-ports", "inbound_ports_exclude",
              default=",".join(DEFAULT_INBOUND_PORTS_EXCLUDE), show_default=True,
              help="Inbound ports never captured (only with --inbound-ports '*').")
@click.option("-i", "--outbound-ip-ranges", "--istio-service-cidr", "outbound_ip_ranges", default="*",
              show_default=True, help="Outbound CIDRs to capture, comma-separated (IPv4 and IPv6); '*' all, '' none.")
@click.option("-x", "--outbound-ip-ranges-exclude", "--istio-service-exclude-cidr", "outbound_ip_ranges_exclude",
              default="", help="Outbound CIDRs never captured.")
@click.option("-q", "--outbound-ports", "--istio-outbound-ports", "outbound_ports", default="",
              help="Outbound ports always captured, whatever the destination.")
@click.option("-o", "--outbound-ports-exclude", "--istio-local-outbound-ports-exclude", "outbound_ports_exclude",
              default="", help="Outbound ports never captured (TCP and UDP).")
@click.option("-k", "--kube-virt-interfaces", default="",
              help="Interfaces whose inbound traffic (from a VM) is treated as outbound.")
@click.option("-c", "--exclude-interfaces", "--istio-exclude-interfaces", "exclude_interfaces", default="",
              help="Interfaces never captured, either way.")
@click.option("--outbound-owner-groups", default="*", show_default=True,
              help="Groups whose outbound traffic is captured (ISTIO_OUTBOUND_OWNER_GROUPS).")
@click.option("--outbound-owner-groups-exclude", default="",
              help="Groups whose outbound traffic is not captured (ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE).")
@click.option("--host-ipv4-loopback-cidr", default="127.0.0.1/32", show_default=True,
              help="Loopback range the app reaches itself on (ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR).")
@click.option("--drop-invalid", is_flag=True, help="Drop conntrack-INVALID packets (Istio's INVALID_DROP).")
@click.option("--ipv6/--no-ipv6", default=None,
              help="Also write ip6tables rules  [default: when the pod's address is IPv6, as istio-iptables]")
@click.option("--dual-stack", is_flag=True, help="With the default --ipv6 detection: IPv6 rules too when the pod "
                                                 "has both families.")
@click.option("-n", "--dry-run", is_flag=True, help="Print the iptables-restore input instead of applying it.")
@click.option("--cleanup", "--cleanup-only", "cleanup", is_flag=True,
              help="Remove the Istio chains and the jumps to them (both families); idempotent.")
def iptables(dry_run: bool, cleanup: bool, **params: Any) -> None:
    """Capture the pod's TCP traffic as istio-iptables does (run as root in the pod's network namespace).

    nat chains ISTIO_INBOUND -> ISTIO_IN_REDIRECT (to --inbound-capture-port) and ISTIO_OUTPUT -> ISTIO_REDIRECT
    (to --envoy-port); the proxy's UID/GID, 127.0.0.6 and localhost are never redirected. The defaults are the
    options Istio's injector gives istio-init; short options are istio-iptables' own.
    """
    from .iptables import build, dry_run_text
    from .netfilter import NetfilterError, apply
    from .netfilter import cleanup as remove

    try:
        config = capture_config(params)
        if dry_run:
            click.echo(dry_run_text(build(config)), nl=False)
        elif cleanup:
            changed = remove(config)
            click.echo(f"removed the Istio rules ({', '.join(changed)})" if changed else "no Istio rules found",
                       err=True)
        else:
            apply(config)
            click.echo(f"applied the capture rules (IPv4{' and IPv6' if config.ipv6 else ''})", err=True)
    except CaptureConfigError as exc:
        raise click.BadParameter(str(exc)) from None
    except NetfilterError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)


@click.command("inject")
@click.option("-f", "--filename", "filename", required=True, type=click.File("r"),
              help="Kubernetes YAML to inject ('-' reads standard input).")
@click.option("-o", "--output", type=click.File("w"), default="-", help="Where to write the result  [default: stdout]")
@click.option("--image", default="meshproxy:latest", show_default=True, envvar="MESHPROXY_IMAGE",
              help="Image of the sidecar and init containers (sidecar.istio.io/proxyImage overrides it per pod).")
@click.option("--config-map", default="meshproxy-config", show_default=True,
              help="ConfigMap holding the Istio routing YAML, mounted at /etc/meshproxy.")
@click.option("--revision", default="default", show_default=True, help="istio.io/rev written on the pods.")
@click.option("--tls-mode-label/--no-tls-mode-label", default=False, show_default=True,
              help="Label pods security.istio.io/tlsMode=istio (Envoy peers then send them mutual TLS).")
@click.option("--hold-application-until-proxy-starts", is_flag=True,
              help="Mesh-wide default of holdApplicationUntilProxyStarts (proxy.istio.io/config overrides it).")
def inject(filename: Any, output: Any, image: str, config_map: str, revision: str, tls_mode_label: bool,
           hold_application_until_proxy_starts: bool) -> None:
    """Add the meshproxy sidecar to workloads, as `istioctl kube-inject -f`.

    Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs, CronJobs and Pods get the istio-init container
    (`meshproxy iptables`), the istio-proxy container (`meshproxy run --transparent`) and Istio's labels and
    annotations; `sidecar.istio.io/inject: "false"` and the traffic.sidecar.istio.io/* annotations are honoured.
    Other documents are written unchanged, in order. Injecting twice gives the same as once.
    """
    from ..istio.problems import ConfigError
    from .inject import InjectOptions, inject_text

    options = InjectOptions(image=image, config_map=config_map, revision=revision, tls_mode_label=tls_mode_label,
                            hold_application_until_proxy_starts=hold_application_until_proxy_starts)
    source = "<stdin>" if filename.name == "<stdin>" else filename.name
    try:
        text, warnings = inject_text(filename.read(), source, options)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(str(problem), err=True)
        sys.exit(1)
    for problem in warnings:
        click.echo(str(problem), err=True)
    output.write(text)


@click.command("wait")
@click.option("--url", default="http://127.0.0.1:15021/healthz/ready", show_default=True,
              help="Readiness URL polled until it answers 200.")
@click.option("--timeout-seconds", "--timeoutSeconds", "timeout", type=float, default=60.0, show_default=True)
@click.option("--period-millis", "--periodMillis", "period", type=int, default=500, show_default=True)
def wait(url: str, timeout: float, period: int) -> None:
    """Wait until the sidecar is ready (as `pilot-agent wait`): the postStart hook of holdApplicationUntilProxyStarts."""
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        try:
            with urllib.request.urlopen(url, timeout=max(period / 1000, 1.0)) as answer:  # noqa: S310 (local URL)
                if answer.status == 200:
                    click.echo(f"{url}: ready", err=True)
                    return
                last = f"status {answer.status}"
        except urllib.error.HTTPError as exc:
            last = f"status {exc.code}"
        except (OSError, ValueError) as exc:
            last = str(exc)
        if time.monotonic() >= deadline:
            click.echo(f"Error: {url} not ready after {timeout:g} s ({last})", err=True)
            sys.exit(1)
        time.sleep(period / 1000)
