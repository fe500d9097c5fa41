"""Run one Bookinfo app: `python -m meshproxy.demo.bookinfo reviews --version v2 --port 9080`."""

import asyncio
import signal
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any

import click
from aiohttp import web

from meshproxy.demo.bookinfo import SERVICES, make_app
from meshproxy.demo.bookinfo.common import AppConfig, Outbound


def _address_map(addresses: tuple[str, ...]) -> dict[str, str]:
    mapped = {}
    for entry in addresses:
        name, sep, address = entry.partition("=")
        if not sep or ":" not in address:
            raise click.BadParameter(f"{entry!r} is not SERVICE=HOST:PORT", param_hint="--address")
        mapped[name] = address
    return mapped


async def _serve(app: web.Application, config: AppConfig, host: str, port: int) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        bound_host, bound_port = runner.addresses[0][:2]
        click.echo(f"bookinfo {config.service} {config.version} listening on http://{bound_host}:{bound_port}")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def _event_loop_runner() -> Callable[[Coroutine[Any, Any, None]], None]:
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


@click.command()
@click.argument("service", type=click.Choice(sorted(SERVICES)))
@click.option("--version", "version", default="v1", show_default=True, help="reviews: v1, v2 (black), v3 (red)")
@click.option("--port", default=9080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--proxy", metavar="URL", help="send calls to other services through this HTTP proxy (the sidecar)")
@click.option(
    "--address", "addresses", multiple=True, metavar="SERVICE=HOST:PORT", help="connect to SERVICE at HOST:PORT"
)
@click.option("--pod-name", help="shown as 'Reviews served by'  [default: SERVICE-VERSION]")
@click.option("--cluster-name", help="reviews' CLUSTER_NAME (unset: null)")
@click.option("--timeout", type=float, help="seconds per outbound attempt  [default: as the original]")
@click.option("--session-secret", envvar="BOOKINFO_SESSION_SECRET", help="productpage cookie key [default: random]")
def main(
    service: str,
    version: str,
    port: int,
    host: str,
    proxy: str | None,
    addresses: tuple[str, ...],
    pod_name: str | None,
    cluster_name: str | None,
    timeout: float | None,
    session_secret: str | None,
) -> None:
    """Run the Bookinfo SERVICE (productpage, details, reviews or ratings)."""
    if proxy and addresses:
        raise click.UsageError("--proxy and --address are exclusive")
    config = AppConfig(
        service=service,
        version=version,
        pod_name=pod_name or f"{service}-{version}",
        outbound=Outbound(proxy=proxy, addresses=_address_map(addresses)),
        timeout=timeout,
        cluster_name=cluster_name,
    )
    if session_secret:
        config = replace(config, session_secret=session_secret.encode())
    try:
        app = make_app(config)
    except ValueError as error:  # e.g. reviews --version v4
        raise click.UsageError(str(error)) from None
    _event_loop_runner()(_serve(app, config, host, port))


if __name__ == "__main__":
    main()
