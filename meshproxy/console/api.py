"""The console's HTTP surface: the static page and the JSON endpoints under /console, over a `ConsoleSource` (one
proxy's own buffers, or every sidecar of the demo). The admin router hands it every /console path.

Endpoints (all GET, JSON; README "Console"):
  /console/api/proxies                     the proxies behind this console
  /console/api/requests?status=&flag=&proxy=&limit=   last requests, newest first, each with its explanation
  /console/api/spans                       the raw recent spans (what a mesh console gathers)
  /console/api/traces?service=&operation=&min_ms=&error=&limit=   trace summaries, newest first
  /console/api/traces/<trace id>           one trace: spans with depth, the request each was, the fault
  /console/api/routes                      each proxy's loaded files and compiled routes
  /console/api/route?authority=&path=&method=&header=name:value&proxy=   which route a request would take
  /console/api/graph?window=60             nodes and edges with rate, error rate, p50/p99, response flags
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol
from urllib.parse import parse_qsl

from .graph import GraphHistory
from .records import filter_requests, search_traces, trace_detail

STATIC = Path(__file__).resolve().parent / "static"
STATIC_FILES = {"index.html": "text/html; charset=utf-8", "console.js": "text/javascript; charset=utf-8",
                "console.css": "text/css; charset=utf-8"}
JSON = "application/json; charset=utf-8"
TEXT = "text/plain; charset=utf-8"
DEFAULT_WINDOW = 60.0
MAX_WINDOW = 3600.0


class Answer(NamedTuple):
    status: int
    body: bytes
    content_type: str


class ConsoleSource(Protocol):
    """Where the console's data comes from. Every method returns plain JSON-ready values."""

    async def proxies(self) -> list[str]: ...
    async def requests(self) -> list[dict[str, Any]]: ...
    async def spans(self) -> list[dict[str, Any]]: ...
    async def metrics(self) -> list[str]: ...  # each proxy's /stats/prometheus text
    async def routes(self) -> list[dict[str, Any]]: ...
    async def route(self, proxy: str, method: str, url: str, headers: list[tuple[str, str]]) -> dict[str, Any]: ...


class ConsoleError(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


def _json(value: Any) -> Answer:
    return Answer(200, json.dumps(value, default=str).encode(), JSON)


def _number(params: dict[str, str], name: str, default: float, low: float, high: float) -> float:
    text = params.get(name, "")
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ConsoleError(400, f"{name}={text!r} is not a number") from None
    if not low <= value <= high:
        raise ConsoleError(400, f"{name}={text!r} is out of range {low:g}..{high:g}")
    return value


class Console:
    def __init__(self, source: ConsoleSource) -> None:
        self.source = source
        self.history = GraphHistory()

    async def answer(self, path: str, query: str) -> Answer:
        try:
            return await self._answer(path, query)
        except ConsoleError as exc:
            return Answer(exc.status, (str(exc) + "\n").encode(), TEXT)

    async def _answer(self, path: str, query: str) -> Answer:
        pairs = parse_qsl(query, keep_blank_values=True)
        params = dict(pairs)
        if path in ("/console", "/console/"):
            return self._static("index.html")
        if path.startswith("/console/static/"):
            return self._static(path.removeprefix("/console/static/"))
        if path == "/console/api/proxies":
            return _json({"proxies": await self.source.proxies()})
        if path == "/console/api/requests":
            limit = int(_number(params, "limit", 500, 1, 100_000))
            records = await self.source.requests()
            if params.get("proxy"):
                records = [r for r in records if r["proxy"] == params["proxy"]]
            return _json({"requests": filter_requests(records, params.get("status", ""), params.get("flag", ""),
                                                      limit)})
        if path == "/console/api/spans":
            return _json({"spans": await self.source.spans()})
        if path == "/console/api/traces":
            error = {"": None, "true": True, "1": True, "false": False, "0": False}.get(params.get("error", "").lower())
            if error is None and params.get("error", ""):
                raise ConsoleError(400, f"error={params['error']!r}: true or false")
            return _json({"traces": search_traces(await self.source.spans(), params.get("service", ""),
                                                  params.get("operation", ""),
                                                  _number(params, "min_ms", 0.0, 0.0, 1e9), error,
                                                  int(_number(params, "limit", 100, 1, 10_000)))})
        if path.startswith("/console/api/traces/"):
            trace_id = path.removeprefix("/console/api/traces/").lower()
            detail = trace_detail(trace_id, await self.source.spans(), await self.source.requests())
            if detail is None:
                raise ConsoleError(404, f"no trace {trace_id} in the recent spans")
            return _json(detail)
        if path == "/console/api/routes":
            return _json({"proxies": await self.source.routes()})
        if path == "/console/api/route":
            return _json(await self._route(params, pairs))
        if path == "/console/api/graph":
            window = _number(params, "window", DEFAULT_WINDOW, 1.0, MAX_WINDOW)
            return _json(self.history.graph(await self.source.metrics(), window))
        raise ConsoleError(404, "404: Not Found")

    async def _route(self, params: dict[str, str], pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
        authority = params.get("authority", "")
        if not authority:
            raise ConsoleError(400, "authority is required (host or host:port)")
        path = params.get("path", "") or "/"
        if not path.startswith("/"):
            raise ConsoleError(400, f"path={path!r} must start with /")
        headers = []
        for name, value in pairs:
            if name == "header":
                key, sep, text = value.partition(":")
                if not sep or not key.strip():
                    raise ConsoleError(400, f"header={value!r} is not 'name: value'")
                headers.append((key.strip().lower(), text.strip()))
        proxies = await self.source.proxies()
        proxy = params.get("proxy", "") or proxies[0]
        if proxy not in proxies:
            raise ConsoleError(404, f"no proxy {proxy!r} (known: {', '.join(proxies)})")
        return await self.source.route(proxy, params.get("method", "") or "GET", f"http://{authority}{path}", headers)

    def _static(self, name: str) -> Answer:
        content_type = STATIC_FILES.get(name)
        if content_type is None:
            raise ConsoleError(404, "404: Not Found")
        return Answer(200, (STATIC / name).read_bytes(), content_type)
