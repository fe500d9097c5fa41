"""One console for a whole local mesh (what `meshproxy demo` starts): every answer gathered from the proxies' own
admin ports (their /console/api/requests, /console/api/spans, /console/api/routes and /stats/prometheus), so the
graph, traces and requests span every sidecar and the ingress gateway.

    python -m meshproxy.console.mesh --listen 127.0.0.1:20100 --proxy productpage-v1=19003 --proxy ...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
from typing import Any
from urllib.parse import urlencode

import aiohttp

from ..admin import Reply, console_reply, serve_routes
from ..settings import parse_address
from .api import Console, ConsoleError

log = logging.getLogger("meshproxy.console")
FETCH_TIMEOUT = 10.0


class MeshSource:
    """The proxies by name, each at its admin URL; a proxy that does not answer is left out of an answer."""

    def __init__(self, admins: dict[str, str]) -> None:
        self.admins = admins
        self.session: aiohttp.ClientSession | None = None

    async def _get(self, name: str, path: str) -> tuple[int, bytes]:
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT))
        async with self.session.get(self.admins[name] + path) as response:
            return response.status, await response.read()

    async def _all(self, path: str) -> list[tuple[str, bytes]]:
        names = list(self.admins)
        results = await asyncio.gather(*(self._get(name, path) for name in names), return_exceptions=True)
        out = []
        for name, result in zip(names, results):
            if isinstance(result, BaseException):
                log.warning("%s: %s failed: %r", name, path, result)
            elif result[0] != 200:
                log.warning("%s: %s answered %d", name, path, result[0])
            else:
                out.append((name, result[1]))
        return out

    async def _json(self, path: str, key: str) -> list[dict[str, Any]]:
        return [item for _, body in await self._all(path) for item in json.loads(body)[key]]

    async def proxies(self) -> list[str]:
        return list(self.admins)

    async def requests(self) -> list[dict[str, Any]]:
        return await self._json("/console/api/requests?limit=100000", "requests")

    async def spans(self) -> list[dict[str, Any]]:
        return await self._json("/console/api/spans", "spans")

    async def metrics(self) -> list[str]:
        return [body.decode() for _, body in await self._all("/stats/prometheus")]

    async def routes(self) -> list[dict[str, Any]]:
        return await self._json("/console/api/routes", "proxies")

    async def route(self, proxy: str, method: str, url: str, headers: list[tuple[str, str]]) -> dict[str, Any]:
        authority, _, path = url.removeprefix("http://").partition("/")
        query = urlencode([("authority", authority), ("path", "/" + path), ("method", method)]
                          + [("header", f"{k}: {v}") for k, v in headers])
        try:
            status, body = await self._get(proxy, f"/console/api/route?{query}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ConsoleError(502, f"{proxy}: {exc!r}") from None
        if status != 200:
            raise ConsoleError(status, body.decode(errors="replace").strip())
        return json.loads(body)  # type: ignore[no-any-return]

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


async def serve(address: tuple[str, int], admins: dict[str, str]) -> None:
    source = MeshSource(admins)
    console = Console(source)

    async def ready() -> Reply:
        return Reply.text("LIVE\n")

    server = await serve_routes([("GET", "/ready", ready)], lambda head: console_reply(console, head), address)
    log.info("console listening on %s:%d", *server.address)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.close()
    await source.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m meshproxy.console.mesh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", required=True, help="host:port of the console")
    parser.add_argument("--proxy", action="append", default=[], help="NAME=ADMIN_PORT (or NAME=http://host:port)")
    args = parser.parse_args(argv)
    admins = {}
    for item in args.proxy:
        name, sep, where = item.partition("=")
        if not sep or not name:
            parser.error(f"--proxy {item!r} is not NAME=ADMIN_PORT")
        admins[name] = where if "://" in where else f"http://127.0.0.1:{int(where)}"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(parse_address(args.listen), admins))


if __name__ == "__main__":
    main()
