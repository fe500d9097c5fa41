"""The idle-10k scenario's client: opens N keep-alive connections to a target, sends one request on each and
reads the answer, then keeps every connection open and idle until its stdin closes.

Prints one JSON line when all connections are set up: {"open": connections that got a 200, "failed": the
others, "seconds": time taken}. At most --parallel connections are being set up at any moment.

Run: python idle_client.py --target HOST:PORT --host HOSTHEADER --connections N
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time

import uvloop

ANSWER_TIMEOUT_SECONDS = 30.0


def raise_open_file_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def one(host: str, port: int, request: bytes, gate: asyncio.Semaphore,
              held: list[asyncio.StreamWriter]) -> bool:
    async with gate:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), ANSWER_TIMEOUT_SECONDS)
        except (TimeoutError, OSError):
            return False
        held.append(writer)
        try:
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), ANSWER_TIMEOUT_SECONDS)
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await asyncio.wait_for(reader.readexactly(length), ANSWER_TIMEOUT_SECONDS)
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            return False
        return head.startswith(b"HTTP/1.1 200")


async def main_async(args: argparse.Namespace) -> None:
    host, _, port = args.target.rpartition(":")
    request = f"GET {args.path} HTTP/1.1\r\nHost: {args.host}\r\n\r\n".encode()
    gate = asyncio.Semaphore(args.parallel)
    held: list[asyncio.StreamWriter] = []
    started = time.monotonic()
    results = await asyncio.gather(*(one(host, int(port), request, gate, held) for _ in range(args.connections)))
    ok = sum(results)
    print(json.dumps({"open": ok, "failed": len(results) - ok, "seconds": round(time.monotonic() - started, 2)}),
          flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the harness closes our stdin
    for writer in held:
        writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True)
    parser.add_argument("--host", required=True, help="Host header")
    parser.add_argument("--path", default="/")
    parser.add_argument("--connections", type=int, required=True)
    parser.add_argument("--parallel", type=int, default=200)
    args = parser.parse_args()
    limit = raise_open_file_limit()
    if args.connections + 50 > limit:
        sys.exit(f"open-file limit {limit} is too low for {args.connections} connections")
    uvloop.run(main_async(args))


if __name__ == "__main__":
    main()
