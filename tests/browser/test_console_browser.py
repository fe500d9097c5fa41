"""The mesh console of `meshproxy demo` in headless Chromium (DevTools protocol, no network), through Istio's
Bookinfo tasks: request routing (reviews-test-v2), fault injection (ratings abort, then the 7 s delay).

What a user sees is read from the live page: the graph's SVG edges (their health class, computed colour, rate
label), the requests table (filtered through the page's own form, then one click to the trace), the trace
timeline (the delayed span, its duration and the fault note). The numbers behind them are checked exactly through
the console's JSON. Screenshots are saved as test artifacts ($MESHPROXY_ARTIFACTS, else artifacts/browser/).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from bookinfo_demo import CONFIG, Demo
from test_bookinfo_browser import HEIGHT, WIDTH, Chromium, Tab, artifacts_dir
from waiting import wait_until

pytestmark = pytest.mark.timeout(300)

RED = "rgb(204, 0, 0)"  # --bad in console.css: Kiali's failure colour
REVIEWS = "service:reviews.default.svc.cluster.local"
RATINGS = "service:ratings.default.svc.cluster.local"
_CONSOLE = re.compile(r"mesh console:\s+(http://\S+)")




def console_url(demo: Demo) -> str:
    found = _CONSOLE.search(demo.text)
    assert found, demo.text
    return found.group(1)


def api(demo: Demo, path: str) -> Any:
    with urllib.request.urlopen(console_url(demo).removesuffix("/console/") + "/console/api" + path,
                                timeout=30) as response:
        return json.loads(response.read())


async def screenshot(tab: Tab, name: str) -> Path:
    height = await tab.js("document.documentElement.scrollHeight")
    await tab.send("Emulation.setDeviceMetricsOverride", width=WIDTH, height=max(HEIGHT, height), deviceScaleFactor=1,
                   mobile=False)
    shot = await tab.send("Page.captureScreenshot", format="png")
    path = artifacts_dir() / f"console-{name}.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    await tab.send("Emulation.clearDeviceMetricsOverride")
    return path


def edge(source: str, target: str) -> str:
    return f"document.querySelector('g.edge[data-source=\"{source}\"][data-target=\"{target}\"]')"


async def read_edge(tab: Tab, source: str, target: str) -> dict[str, Any] | None:
    return await tab.js(f"""(() => {{ const g = {edge(source, target)}; if (!g) return null;
      return {{health: g.dataset.health, requests: +g.dataset.requests, rate: g.dataset.rate,
               label: g.querySelector('text').textContent, stroke: getComputedStyle(g.querySelector('path')).stroke}};
    }})()""")


async def walkthrough(demo: Demo, port: int) -> dict[str, Any]:
    seen: dict[str, Any] = {"shots": []}
    url = console_url(demo)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/json/list") as response:
            targets = await response.json()
        [target] = [t for t in targets if t["type"] == "page"]
        async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            tab = Tab(ws)
            await tab.send("Page.enable")
            await tab.send("Page.navigate", url=url + "#graph")
            await tab.wait_for("document.querySelector('#graph-status')?.textContent", "the graph's first sample")

            # Request routing: anonymous users get reviews v1, jason v2.
            jason = await asyncio.to_thread(demo.login, "jason")
            anonymous = await asyncio.to_thread(demo.pages, 10)
            signed_in = await asyncio.to_thread(demo.pages, 10, jason)
            assert {p.version for p in anonymous} == {"v1"} and {p.version for p in signed_in} == {"v2"}
            for version in ("v1", "v2"):
                await tab.wait_for(f"+{edge(REVIEWS, 'workload:default/reviews-' + version)}?.dataset.requests >= 10 "
                                   f"&& {edge(REVIEWS, 'workload:default/reviews-' + version)}.dataset.rate !== ''",
                                   f"the reviews -> reviews {version} edge with a rate")
                seen[f"reviews-{version}"] = await read_edge(tab, REVIEWS, f"workload:default/reviews-{version}")
            seen["productpage-reviews"] = await read_edge(tab, "workload:default/productpage-v1", REVIEWS)
            seen["shots"].append(await screenshot(tab, "graph-routing"))

            # Fault injection, abort: jason's ratings calls get 500 from reviews v2's sidecar.
            await asyncio.to_thread(demo.apply, CONFIG / "virtual-service-ratings-test-abort.yaml")
            aborted = await asyncio.to_thread(demo.pages, 10, jason)
            assert all(p.status == 200 and p.rating_errors for p in aborted), aborted[0].describe()
            await tab.wait_for(f"{edge('workload:default/reviews-v2', RATINGS)}?.dataset.health === 'failure'",
                               "the reviews v2 -> ratings edge red")
            seen["reviews-ratings"] = await read_edge(tab, "workload:default/reviews-v2", RATINGS)
            seen["shots"].append(await screenshot(tab, "graph-abort"))

            # The requests view, filtered by the page's form, explains the failed call; one click to its trace.
            await tab.send("Page.navigate", url=url + "#requests")
            await tab.wait_for("document.querySelectorAll('#request-list tr.request').length", "the requests")
            await tab.type_into("#request-filter input[name=flag]", "FI")
            await tab.click("#request-filter button")
            await tab.wait_for("[...document.querySelectorAll('#request-list tr.request')].length > 0 && "
                               "[...document.querySelectorAll('#request-list tr.request')]"
                               ".every(tr => tr.dataset.flags === 'FI')", "only FI requests listed")
            seen["abort-row"] = await tab.js("document.querySelector('#request-list tr.request').innerText")
            seen["shots"].append(await screenshot(tab, "requests-abort"))
            await tab.click("#request-list tr.request a.trace-link")
            await tab.wait_for("!!document.querySelector('.timeline .span[data-flags=\"FI\"]')", "the aborted span")
            seen["abort-trace"] = await tab.js("document.querySelector('#trace-detail').innerText")

            # Fault injection, 7 s delay: productpage gives up on reviews after 2 x 3 s.
            await asyncio.to_thread(demo.apply, CONFIG / "virtual-service-ratings-test-delay.yaml")
            page = await asyncio.to_thread(demo.page, jason)
            assert page.status == 200 and page.reviews_error and page.elapsed >= 5.5, page.describe()
            slow = await asyncio.to_thread(wait_until, lambda: api(demo, "/traces?min_ms=6900")["traces"], 30.0,
                                           "the delayed trace")
            seen["delay-summary"] = slow
            await tab.send("Page.navigate", url=url + "#traces")
            await tab.wait_for("!!document.querySelector('#trace-search input[name=min_ms]')", "the trace search")
            await tab.type_into("#trace-search input[name=min_ms]", "6900")
            await tab.click("#trace-search button")
            await tab.wait_for("document.querySelectorAll('#trace-list tr.trace').length === 1", "one slow trace")
            await tab.click("#trace-list tr.trace")
            await tab.wait_for("!!document.querySelector('.timeline .span[data-flags=\"DI\"]')", "the delayed span")
            seen["delay-spans"] = await tab.js("""[...document.querySelectorAll('.timeline .span')].map(s => ({
              flags: s.dataset.flags, duration: +s.dataset.duration, text: s.innerText,
              indent: parseFloat(s.querySelector('.label').style.paddingLeft),
              barColor: getComputedStyle(s.querySelector('.bar')).backgroundColor}))""")
            seen["shots"].append(await screenshot(tab, "trace-delay"))

            # ... and the requests view explains jason's failed request to reviews.
            await tab.send("Page.navigate", url=url + "#requests")
            await tab.wait_for("!!document.querySelector('#request-filter input[name=flag]')", "the requests form")
            await tab.js("document.querySelector('#request-filter input[name=flag]').value = ''")  # it kept FI
            await tab.type_into("#request-filter input[name=flag]", "DC")
            await tab.click("#request-filter button")
            await tab.wait_for("[...document.querySelectorAll('#request-list tr.request')].length > 0 && "
                               "[...document.querySelectorAll('#request-list tr.request')]"
                               ".every(tr => tr.dataset.flags === 'DC')", "only DC requests listed")
            seen["delay-rows"] = await tab.js(
                "[...document.querySelectorAll('#request-list tr.request')].map(tr => tr.innerText)")
            seen["shots"].append(await screenshot(tab, "requests-delay"))

            # Routing: reviews-v2's loaded files and routes, and which route jason's call to ratings takes.
            await tab.send("Page.navigate", url=url + "#routing")
            await tab.wait_for("document.querySelectorAll('#route-tables .proxy-routes').length === 1",
                               "the first proxy's routes")
            await tab.js("(() => { const s = document.querySelector('#which-route select[name=proxy]');"
                         " s.value = 'reviews-v2'; s.dispatchEvent(new Event('change')); })()")
            await tab.wait_for("document.querySelector('#route-tables .proxy-routes')?.dataset.proxy === 'reviews-v2'",
                               "reviews-v2's routes")
            await tab.type_into("#which-route input[name=authority]", "ratings:9080")
            await tab.js("document.querySelector('#which-route input[name=path]').value = ''")
            await tab.type_into("#which-route input[name=path]", "/ratings/0")
            await tab.type_into("#which-route textarea[name=headers]", "end-user: jason")
            await tab.click("#which-route button")
            await tab.wait_for("document.querySelector('#route-answer').textContent.includes('chosen:')",
                               "the which-route answer")
            seen["route-answer"] = await tab.js("document.querySelector('#route-answer').textContent")
            seen["route-tables"] = await tab.js("document.querySelector('#route-tables').innerText")
            seen["shots"].append(await screenshot(tab, "routing"))
    return seen


def test_the_console_follows_the_bookinfo_tasks_in_chromium(demo: Demo, tmp_path: Path) -> None:
    browser = Chromium(tmp_path / "profile")
    try:
        seen = asyncio.run(walkthrough(demo, browser.devtools_port()))
    finally:
        browser.close()

    # Request routing: both versions of reviews get traffic from productpage, with a rate on the edge.
    for version in ("v1", "v2"):
        found = seen[f"reviews-{version}"]
        assert found["requests"] == 10 and found["health"] == "healthy", found
        assert float(found["rate"]) > 0 and re.search(r"\d+\.\d+ rps", found["label"]), found
    assert seen["productpage-reviews"]["requests"] == 20, seen["productpage-reviews"]
    # Abort: the reviews v2 -> ratings edge is red, all of its requests 500 FI.
    red = seen["reviews-ratings"]
    assert red["health"] == "failure" and red["stroke"] == RED, red
    # 10 calls of jason's pages before the fault, 10 aborted after it, all in the window
    assert red["requests"] == 20 and "50.0 % 5xx" in red["label"] and "FI" in red["label"], red
    assert "GET ratings:9080/ratings/0" in seen["abort-row"] and "500" in seen["abort-row"]
    assert "fault injection aborted the request with 500 (route of VirtualService default/ratings http[0])" \
        in seen["abort-row"], seen["abort-row"]
    assert "abort 500 injected (100 % of requests)" in seen["abort-trace"], seen["abort-trace"]
    # Delay: the trace's delayed span is the reviews sidecar's call to ratings, 7 s, under reviews' own span.
    [summary] = seen["delay-summary"]
    assert summary["duration_ms"] >= 7000 and "DI" in summary["flags"], summary
    spans = seen["delay-spans"]
    [delayed] = [s for s in spans if s["flags"] == "DI"]
    assert delayed["duration"] >= 7000 and delayed["text"].startswith("reviews.default · ratings"), delayed
    assert "fault: delay 7 s injected (100 % of requests)" in delayed["text"], delayed
    parents = [s for s in spans[:spans.index(delayed)] if s["text"].startswith("reviews.default") and
               s["indent"] < delayed["indent"]]
    assert parents, spans  # drawn under a reviews span
    assert delayed["barColor"] != spans[0]["barColor"], spans  # the delayed bar stands out
    # jason's failed request: productpage's call to reviews, abandoned by the app after 3 s (twice: one retry)
    failed = [row for row in seen["delay-rows"] if "productpage-v1 (outbound)" in row]
    assert len(failed) == 2, seen["delay-rows"]
    for row in failed:
        assert "GET reviews:9080/reviews/0" in row and "subset v2" in row, row
        assert re.search(r"the caller closed the connection after [23]\.\d\ds, before the response was complete: DC",
                         row), row
    # Routing: the answer is `meshproxy route`'s, for reviews-v2's sidecar.
    answer = seen["route-answer"]
    assert answer.startswith("reviews-v2: request GET /ratings/0  (authority 'ratings:9080', 1 header line(s))"), answer
    assert "chosen: VirtualService default/ratings, http[0]" in answer, answer
    assert "virtualservice.default.ratings.yaml" in seen["route-tables"], seen["route-tables"]
    assert "fault: delay 7 s injected (100 % of requests)" in seen["route-tables"], seen["route-tables"]
    for shot in seen["shots"]:
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000, shot

    # The same numbers, exactly, from the console's JSON.
    codes = {(e["source"], e["target"]): e for e in api(demo, "/graph?window=3600")["edges"]}
    assert codes[("workload:default/reviews-v2", RATINGS)]["codes"].get("500") == 10
    assert codes[("workload:default/reviews-v2", RATINGS)]["flags"].get("FI") == 10
