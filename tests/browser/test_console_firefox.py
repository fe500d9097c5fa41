"""The mesh console in headless Firefox (ESR), driven over WebDriver BiDi: no geckodriver, no network.

Issue 17 promises the page works in current Chromium and Firefox; test_console_browser.py covers Chromium against
`meshproxy demo`. This one is cheaper: ONE real proxy with the console on its admin port (the set-up of
tests/integration/test_console_api.py: two real loopback upstreams, a VirtualService with an abort fault, a retried
route), known traffic, then the four views read from the live page in Firefox: the graph's SVG nodes and edge, the
requests view filtered through its own form (typed with real key events) explaining the faulted request, its trace
timeline, the traces search, and the routing view's "which route" form, whose answer must equal the JSON API's.
Every JavaScript error or console.error the page logs (BiDi `log.entryAdded`, level error) fails the test; a probe
error thrown at the end shows that the listener does hear them. Screenshots: artifacts/browser/firefox-*.png
($MESHPROXY_ARTIFACTS/browser/ when set). .ci/run installs Debian's `firefox-esr`; without it the test is skipped.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import websockets
from harness import ProxyProcess, Upstream
from test_bookinfo_browser import artifacts_dir, wait_for_js

# The API test's proxy set-up, traffic helpers and routing, reused as they are (tests/integration is not a package).
sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))
from test_console_api import api, send, start  # noqa: E402

pytestmark = pytest.mark.timeout(180)

FIREFOX = shutil.which("firefox-esr") or shutil.which("firefox")
START_TIMEOUT = 60.0
STEP_TIMEOUT = 20.0
WIDTH, HEIGHT = 1280, 1000
RED = "rgb(204, 0, 0)"  # --bad in console.css: Kiali's failure colour
WEB = "workload:default/web-v1"
BACKEND = "service:backend.default.svc.cluster.local"
_LISTENING = re.compile(r"WebDriver BiDi listening on (ws://\S+)")
# Quiet, offline, no first-run pages; the remote agent adds its own recommended automation preferences.
PREFS = {
    "browser.shell.checkDefaultBrowser": False,
    "datareporting.policy.dataSubmissionEnabled": False,
    "toolkit.telemetry.reportingpolicy.firstRun": False,
    "app.update.disabledForTesting": True,
    "app.normandy.enabled": False,
    "messaging-system.rsexperimentloader.enabled": False,
    "browser.safebrowsing.update.enabled": False,
    "network.captive-portal-service.enabled": False,
    "network.connectivity-service.enabled": False,
}


# --------------------------------------------------------------------------- Firefox over WebDriver BiDi


class Firefox:
    """A headless Firefox with a fresh profile; its WebDriver BiDi websocket URL is read from its stderr."""

    def __init__(self, profile: Path) -> None:
        assert FIREFOX is not None
        profile.mkdir(parents=True)
        (profile / "user.js").write_text("".join(f"user_pref({json.dumps(k)}, {json.dumps(v)});\n"
                                                 for k, v in PREFS.items()))
        self.lines: list[str] = []
        self._url: str | None = None
        self._found = threading.Event()
        self.proc = subprocess.Popen([FIREFOX, "--headless", "--no-remote", "-profile", str(profile),
                                      "--remote-debugging-port", "0", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:  # read to the end: a full pipe would block Firefox
            self.lines.append(line)
            found = _LISTENING.search(line)
            if found and self._url is None:
                self._url = found.group(1)
                self._found.set()
        self._found.set()

    def bidi_url(self) -> str:
        if not self._found.wait(START_TIMEOUT) or self._url is None:
            raise RuntimeError(f"firefox did not open WebDriver BiDi in {START_TIMEOUT:.0f}s: {self.log()}")
        return self._url + "/session"

    def log(self) -> str:
        return "".join(self.lines)[-3000:]

    def close(self) -> None:
        """Firefox's content processes are its children: wait for them too, kill what outlives the parent."""
        try:
            family = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        for child in family:
            try:
                child.wait(5)
            except psutil.TimeoutExpired:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        self._reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


class Page:
    """One browsing context over a BiDi session: commands by id, `log.entryAdded` events kept in `logs`."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.logs: list[dict[str, Any]] = []
        self.context = ""
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for raw in self.ws:
            message = json.loads(raw)
            if message.get("type") == "event":
                if message["method"] == "log.entryAdded":
                    self.logs.append(message["params"])
            elif (waiting := self.pending.pop(message.get("id"), None)) is not None and not waiting.done():
                waiting.set_result(message)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        message_id = next(self.ids)
        reply: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[message_id] = reply
        await self.ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
        async with asyncio.timeout(STEP_TIMEOUT):
            message = await reply
        if message.get("type") == "error":
            raise RuntimeError(f"{method}: {message.get('error')}: {message.get('message')}")
        return message["result"]  # type: ignore[no-any-return]

    async def open(self) -> None:
        await self.send("session.new", capabilities={})
        await self.send("session.subscribe", events=["log.entryAdded"])
        self.context = (await self.send("browsingContext.getTree"))["contexts"][0]["context"]
        await self.send("browsingContext.setViewport", context=self.context,
                        viewport={"width": WIDTH, "height": HEIGHT})

    async def navigate(self, url: str) -> None:
        await self.send("browsingContext.navigate", context=self.context, url=url, wait="complete")

    async def js(self, expression: str) -> Any:
        """The expression's value, through JSON (BiDi's own remote values are richer than a test needs)."""
        result = await self.send("script.evaluate", expression=f"(async () => JSON.stringify(await ({expression})))()",
                                 target={"context": self.context}, awaitPromise=True, resultOwnership="none")
        if result["type"] == "exception":
            raise RuntimeError(f"{expression}: {result['exceptionDetails'].get('text')}")
        value = result["result"]
        return json.loads(value["value"]) if value["type"] == "string" else None

    async def wait_for(self, expression: str, what: str) -> Any:
        return await wait_for_js(self.js, expression, what, STEP_TIMEOUT)

    async def wait_for_log(self, text: str) -> list[dict[str, Any]]:
        deadline = time.monotonic() + STEP_TIMEOUT
        while time.monotonic() < deadline:
            if found := [entry for entry in self.logs if text in str(entry.get("text"))]:
                return found
            await asyncio.sleep(0.05)
        return []

    async def click(self, selector: str) -> None:
        """A real mouse click at the element's centre (what a user does), not element.click()."""
        x, y = await self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
                             " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
                             " return [Math.round(r.x + r.width / 2), Math.round(r.y + r.height / 2)]; })()")
        await self.send("input.performActions", context=self.context, actions=[{
            "type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"},
            "actions": [{"type": "pointerMove", "x": x, "y": y, "origin": "viewport"},
                        {"type": "pointerDown", "button": 0}, {"type": "pointerUp", "button": 0}]}])
        await self.send("input.releaseActions", context=self.context)

    async def type_into(self, selector: str, text: str) -> None:
        """Focus by a click, clear, then real key events, one character at a time ("\n" as Enter)."""
        await self.js(f"document.querySelector({json.dumps(selector)}).value = ''")
        await self.click(selector)
        keys = ["\ue007" if ch == "\n" else ch for ch in text]
        await self.send("input.performActions", context=self.context, actions=[{
            "type": "key", "id": "keyboard",
            "actions": [step for key in keys for step in ({"type": "keyDown", "value": key},
                                                          {"type": "keyUp", "value": key})]}])
        await self.send("input.releaseActions", context=self.context)

    async def screenshot(self, name: str) -> Path:
        shot = await self.send("browsingContext.captureScreenshot", context=self.context, origin="document")
        path = artifacts_dir() / f"firefox-{name}.png"
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    async def close(self) -> None:
        try:
            await self.send("browser.close")
        except (RuntimeError, TimeoutError, websockets.ConnectionClosed):
            pass  # Firefox.close() ends the process anyway
        self.reader.cancel()


# --------------------------------------------------------------------------- the walkthrough


def edge(source: str, target: str) -> str:
    return f"document.querySelector('#graph g.edge[data-source=\"{source}\"][data-target=\"{target}\"]')"


ROWS = "[...document.querySelectorAll('#request-list tr.request')]"


async def walkthrough(url: str, console: str) -> dict[str, Any]:
    seen: dict[str, Any] = {"shots": []}
    async with websockets.connect(url, max_size=None, open_timeout=STEP_TIMEOUT) as ws:
        page = Page(ws)
        await page.open()

        # Graph: the two nodes and the edge between them, red, with the traffic's numbers on its label.
        await page.navigate(console + "#graph")
        await page.wait_for("!!document.querySelector('#graph-status').textContent", "the graph's first sample")
        # the 5 minute window: the traffic stays in it however slowly Firefox started on a loaded machine
        await page.js("(() => { const s = document.querySelector('#graph-window');"
                      " s.value = '300'; s.dispatchEvent(new Event('change')); })()")
        await page.wait_for("document.querySelector('#graph-status').textContent.includes('(window 300 s)') && "
                            f"+{edge(WEB, BACKEND)}?.dataset.requests === 15 && "
                            f"{edge(WEB, BACKEND)}.dataset.rate !== ''", "the web -> backend edge with a rate")
        seen["nodes"] = await page.js("[...document.querySelectorAll('#graph g.node')].map(g => ({id: g.dataset.id, "
                                      "label: g.querySelector('text').textContent, "
                                      "shape: g.firstElementChild.localName}))")
        seen["edges"] = await page.js("document.querySelectorAll('#graph g.edge').length")
        seen["edge"] = await page.js(f"""(() => {{ const g = {edge(WEB, BACKEND)}, p = g.querySelector('path');
          const box = p.getBBox();
          return {{health: g.dataset.health, rate: g.dataset.rate, label: g.querySelector('text').textContent,
                   stroke: getComputedStyle(p).stroke, length: Math.hypot(box.width, box.height)}}; }})()""")
        seen["edge-table"] = await page.js("document.querySelector('#edges').innerText")
        seen["window"] = await page.js("document.querySelector('#graph-status').textContent")
        seen["proxies"] = await page.js("document.querySelector('#proxies').textContent")
        seen["shots"].append(await page.screenshot("graph"))

        # Requests: filter by flag through the form, typed; the faulted requests explained; one click to the trace.
        await page.navigate(console + "#requests")
        await page.wait_for(f"{ROWS}.length === 15", "all 15 requests listed")
        await page.type_into("#request-filter input[name=flag]", "FI")
        await page.click("#request-filter button")
        await page.wait_for(f"{ROWS}.length === 3 && {ROWS}.every(tr => tr.dataset.flags === 'FI')",
                            "only the 3 FI requests listed")
        seen["fi-rows"] = await page.js(f"{ROWS}.map(tr => tr.innerText)")
        seen["shots"].append(await page.screenshot("requests"))
        await page.click("#request-list tr.request a.trace-link")
        await page.wait_for("!!document.querySelector('.timeline .span[data-flags=\"FI\"]')", "the aborted span")
        seen["fi-trace"] = await page.js("document.querySelector('#trace-detail').innerText")
        seen["fi-bar"] = await page.js("""(() => { const bar = document.querySelector('.timeline .span .bar'),
          track = bar.parentElement.getBoundingClientRect(), box = bar.getBoundingClientRect();
          return {color: getComputedStyle(bar).backgroundColor, width: box.width, track: track.width,
                  inside: box.left >= track.left - 1 && box.right <= track.right + 1}; })()""")
        seen["shots"].append(await page.screenshot("trace"))

        # Traces: search errors only (the select, then the button); a row opens its timeline.
        await page.navigate(console + "#traces")
        await page.wait_for("document.querySelectorAll('#trace-list tr.trace').length === 15", "all 15 traces")
        await page.js("(() => { const s = document.querySelector('#trace-search select[name=error]');"
                      " s.value = 'true'; s.dispatchEvent(new Event('change')); })()")
        await page.click("#trace-search button")
        await page.wait_for("document.querySelectorAll('#trace-list tr.trace').length === 5", "the 5 failed traces")
        seen["error-traces"] = await page.js("[...document.querySelectorAll('#trace-list tr.trace')]"
                                             ".map(tr => tr.querySelector('td.flags').textContent)")
        await page.click("#trace-list tr.trace td.flags")
        await page.wait_for("document.querySelectorAll('.timeline .span').length === 1", "a failed trace's timeline")
        seen["searched-trace"] = await page.js("({hash: location.hash, flags: "
                                               "document.querySelector('.timeline .span').dataset.flags})")

        # Routing: the loaded file and compiled routes; which route jason's request takes, typed into the form.
        await page.navigate(console + "#routing")
        await page.wait_for("document.querySelectorAll('#route-tables .proxy-routes').length === 1", "the routes")
        seen["route-tables"] = await page.js("document.querySelector('#route-tables').innerText")
        await page.type_into("#which-route input[name=authority]", "backend:9080")
        await page.type_into("#which-route input[name=path]", "/reviews/1")
        await page.type_into("#which-route textarea[name=headers]", "end-user: jason")
        await page.click("#which-route button")
        await page.wait_for("document.querySelector('#route-answer').textContent.includes('chosen:')",
                            "the which-route answer")
        seen["route-answer"] = await page.js("document.querySelector('#route-answer').textContent")
        seen["route-chosen"] = await page.js("document.querySelector('#route-answer').dataset.chosen")
        seen["shots"].append(await page.screenshot("routing"))

        # Everything the page logged at level error; then a probe error, to show such an error would be heard.
        seen["errors"] = [entry for entry in page.logs if entry.get("level") == "error"]
        await page.js("void setTimeout(() => { throw new Error('console-firefox-probe'); })")
        seen["probe"] = await page.wait_for_log("console-firefox-probe")
        await page.close()
    return seen


@pytest.fixture(scope="module")
def upstreams() -> Iterator[tuple[Upstream, Upstream]]:
    if FIREFOX is None:
        pytest.skip("no Firefox found (looked for firefox-esr, firefox): `apt-get install firefox-esr`")
    v1, v2 = Upstream("v1"), Upstream("v2")
    yield v1, v2
    v1.close()
    v2.close()


def test_the_console_works_in_firefox(tmp_path: Path, upstreams: tuple[Upstream, Upstream]) -> None:
    proxy: ProxyProcess = start(tmp_path, upstreams)
    browser: Firefox | None = None
    try:
        api(proxy, "/console/api/graph")  # the graph's baseline sample: the page's rates start from here
        statuses = [send(proxy, "/echo") for _ in range(6)]
        statuses += [send(proxy, "/echo", {"end-user": "jason"}) for _ in range(4)]
        statuses += [send(proxy, "/fault") for _ in range(3)]
        statuses += [send(proxy, "/status/503") for _ in range(2)]
        assert statuses == [200] * 10 + [500] * 3 + [503] * 2
        expected_answer = api(proxy, "/console/api/route", authority="backend:9080", path="/reviews/1",
                              header=["end-user: jason"])

        browser = Firefox(tmp_path / "profile")
        seen = asyncio.run(walkthrough(browser.bidi_url(), proxy.admin + "/console/"))
    finally:
        if browser is not None:
            browser.close()
        assert proxy.stop() == 0, proxy.log

    # Graph: the calling workload (a circle) and the service (a triangle), one red edge drawn between them.
    nodes = {n["id"]: n for n in seen["nodes"]}
    assert set(nodes) == {WEB, BACKEND}, seen["nodes"]
    assert (nodes[WEB]["label"], nodes[WEB]["shape"]) == ("web v1", "circle")
    assert (nodes[BACKEND]["label"], nodes[BACKEND]["shape"]) == ("backend", "polygon")
    found = seen["edge"]
    assert seen["edges"] == 1 and found["health"] == "failure" and found["stroke"] == RED, found
    assert float(found["rate"]) > 0 and found["length"] > 50, found
    assert re.match(r"\d+\.\d+ rps33\.3 % 5xxp50 [\d.]+ m?s p99 [\d.]+ m?sFI URX$", found["label"]), found
    assert seen["window"].startswith("over the last ") and "(window 300 s)" in seen["window"], seen["window"]
    assert "web v1\tbackend\t15\t" in seen["edge-table"] and "200×10 500×3 503×2" in seen["edge-table"], seen
    assert seen["proxies"] == "1 proxy"
    # Requests: the three aborted requests, each explained, with route and fault.
    assert len(seen["fi-rows"]) == 3
    for row in seen["fi-rows"]:
        assert "web-v1 (outbound)" in row and "GET backend:9080/fault" in row and "\t500\t" in row, row
        assert ("fault injection aborted the request with 500 "
                "(route 'broken' of VirtualService default/backend http[1])") in row, row
        assert "fault_filter_abort" in row, row
    # The trace opened from the request: its one span, the fault named with its route; the bar drawn in its track.
    trace = seen["fi-trace"]
    assert "1 spans" in trace and "FI" in trace, trace
    assert "fault: abort 500 injected (100 % of requests) by route broken of VirtualService default/backend http[1]" \
        in trace, trace
    bar = seen["fi-bar"]
    assert bar["color"] == RED and bar["inside"] and bar["width"] >= 2 and bar["track"] > 300, bar
    # Traces search: errors only, the five failed requests; a click opens one.
    assert sorted(seen["error-traces"]) == ["FI"] * 3 + ["URX"] * 2, seen["error-traces"]
    assert seen["searched-trace"]["hash"].startswith("#traces/") and seen["searched-trace"]["flags"] in ("FI", "URX")
    # Routing: the file and the four routes, and the form's answer is the API's (which equals `meshproxy route`).
    tables = seen["route-tables"]
    assert str(tmp_path / "config" / "backend.yaml") in tables, tables
    assert all(name in tables for name in ("jason", "broken", "flaky", "everyone")), tables
    assert "fault: abort 500 injected (100 % of requests)" in tables, tables
    assert seen["route-chosen"] == "jason"
    assert seen["route-answer"] == "\n".join([f"{expected_answer['proxy']}: request {expected_answer['request']}",
                                              *expected_answer["lines"]]), seen["route-answer"]
    # No JavaScript error on any view; the probe shows the listener hears them.
    assert seen["errors"] == [], "\n".join(f"{e.get('type')}: {e.get('text')} {e.get('stackTrace')}"
                                             for e in seen["errors"])
    assert seen["probe"] and seen["probe"][0]["level"] == "error" and seen["probe"][0]["type"] == "javascript", seen
    for shot in seen["shots"]:
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000, shot
