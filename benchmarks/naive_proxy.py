"""The `aiohttp-naive` target: the reverse proxy one writes in an afternoon with aiohttp, as a reference point.

An aiohttp web server whose one handler reads the whole request, sends it to one upstream with an aiohttp
ClientSession (keep-alive pool without a limit), reads the whole answer and returns it. No route table, no
retries, no telemetry, no streaming; hop-by-hop headers dropped both ways. Runs on uvloop, like meshproxy.

Run: python naive_proxy.py --listen PORT --upstream HOST:PORT
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import aiohttp
import uvloop
from aiohttp import web

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "transfer-encoding", "upgrade", "content-length"})


def make_app(upstream: str) -> web.Application:
    app = web.Application(client_max_size=64 << 20)
    sessions: list[aiohttp.ClientSession] = []

    async def open_session(app: web.Application) -> None:
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        sessions.append(aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                              timeout=aiohttp.ClientTimeout(total=None)))

    async def close_session(app: web.Application) -> None:
        await sessions[0].close()

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {name: value for name, value in request.headers.items() if name.lower() not in HOP_BY_HOP}
        async with sessions[0].request(request.method, upstream + request.rel_url.raw_path_qs, headers=headers,
                                       data=body or None, allow_redirects=False,
                                       skip_auto_headers=("User-Agent", "Accept-Encoding")) as answer:
            data = await answer.read()
            out = {name: value for name, value in answer.headers.items() if name.lower() not in HOP_BY_HOP}
            return web.Response(status=answer.status, headers=out, body=data)

    app.on_startup.append(open_session)
    app.on_cleanup.append(close_session)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


async def serve(port: int, upstream: str) -> None:
    runner = web.AppRunner(make_app(upstream), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--upstream", required=True, help="HOST:PORT every request goes to")
    args = parser.parse_args()
    uvloop.run(serve(args.listen, "http://" + args.upstream))


if __name__ == "__main__":
    main()
