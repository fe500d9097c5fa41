"""The product page in a real browser: headless Chromium, driven over the DevTools protocol, no network.

Chromium loads http://127.0.0.1:<ingress>/productpage through the demo's ingress gateway, signs in as jason
through the page's own dialog and form (routing: virtual-service-all-v1 + reviews-test-v2), and the test
reads the rendered stars from the live DOM: their count, their computed colour, their size on screen. The
screenshot is saved as a test artifact: $MESHPROXY_ARTIFACTS, else artifacts/browser/ in the repo (ignored
by git). .ci/run installs Debian's `chromium`; without it the test is skipped.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from bookinfo_demo import REPO, Demo

pytestmark = pytest.mark.timeout(180)

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM = next((found for name in BROWSERS if (found := shutil.which(name))), None)
START_TIMEOUT = 30.0
STEP_TIMEOUT = 15.0
WIDTH, HEIGHT = 1280, 1000
BLACK = "rgb(0, 0, 0)"


def artifacts_dir() -> Path:
    folder = Path(os.environ.get("MESHPROXY_ARTIFACTS") or REPO / "artifacts") / "browser"
    folder.mkdir(parents=True, exist_ok=True)
    return folder




# --------------------------------------------------------------------------- Chromium


class Chromium:
    """A headless Chromium with a fresh profile and its DevTools endpoint on a port it picks."""

    def __init__(self, profile: Path) -> None:
        assert CHROMIUM is not None
        self.profile = profile
        self.log = open(profile.parent / "chromium.log", "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--no-default-browser-check",
            "--disable-extensions", "--disable-default-apps", "--mute-audio", "--hide-scrollbars",
            f"--user-data-dir={profile}", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
            f"--window-size={WIDTH},{HEIGHT}", "about:blank",
        ], stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.started: list[psutil.Process] = []

    def devtools_port(self) -> int:
        """Chromium writes the port it got to <profile>/DevToolsActivePort."""
        active = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}: {self.log_text()}")
            lines = active.read_text().splitlines() if active.exists() else []
            if lines and lines[0].isdigit():
                self.started = psutil.Process(self.proc.pid).children(recursive=True)
                return int(lines[0])
            time.sleep(0.05)
        raise RuntimeError(f"chromium did not open its DevTools port in {START_TIMEOUT:.0f}s: {self.log_text()}")

    def log_text(self) -> str:
        self.log.flush()
        return (self.profile.parent / "chromium.log").read_text(errors="replace")[-3000:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        for child in self.started:  # its zygote, GPU and renderer processes
            try:
                child.wait(5)
            except psutil.TimeoutExpired:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        self.log.close()


async def wait_for_js(js: Callable[[str], Awaitable[Any]], expression: str, what: str,
                      timeout: float = STEP_TIMEOUT) -> Any:
    """The first truthy value of `expression` in the page (any browser: `js` evaluates it), polled."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = await js(expression)
        except RuntimeError:  # the page is navigating: its context went away
            value = None
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}: {await js('document.body.innerText')}")


class Tab:
    """One page target over its DevTools websocket: commands by id, events dropped."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        message_id = next(self.ids)
        await self.ws.send_str(json.dumps({"id": message_id, "method": method, "params": params}))
        async with asyncio.timeout(STEP_TIMEOUT):
            while True:
                reply = json.loads((await self.ws.receive()).data)
                if reply.get("id") == message_id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]  # type: ignore[no-any-return]

    async def js(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, what: str) -> Any:
        return await wait_for_js(self.js, expression, what)

    async def type_into(self, selector: str, text: str) -> None:
        await self.js(f"document.querySelector({json.dumps(selector)}).focus()")
        await self.send("Input.insertText", text=text)

    async def click(self, selector: str) -> None:
        """A real mouse click at the element's centre (what a user does), not element.click()."""
        box = await self.js(f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
                            ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        x, y = box
        for kind in ("mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)


# What the test reads from the live page once rendered: the stars the reader sees, per review.
READ_STARS = """(() => [...document.querySelectorAll("section.review")].map(section => ({
  servedBy: section.querySelector(".served-by").textContent,
  filled: [...section.querySelectorAll("svg.star-filled")].map(star => {
    const style = getComputedStyle(star), box = star.getBoundingClientRect();
    return {color: style.color, fill: style.fill, width: box.width, height: box.height};
  }),
  empty: section.querySelectorAll("svg.star-empty").length,
  ratingError: section.querySelector(".rating-error")?.textContent ?? null,
})))()"""


async def sign_in_as_jason(port: int, page_url: str, screenshot: Path) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/json/list") as response:
            targets = await response.json()
        [target] = [t for t in targets if t["type"] == "page"]
        async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            tab = Tab(ws)
            await tab.send("Page.enable")
            await tab.send("Page.navigate", url=page_url)
            await tab.wait_for("document.readyState === 'complete' && !!document.querySelector('#sign-in-button')",
                               "the product page, signed out")
            before = await tab.js(READ_STARS)
            await tab.click("#sign-in-button")
            await tab.wait_for("document.querySelector('dialog').open", "the sign-in dialog")
            await tab.type_into("#username", "jason")
            await tab.type_into("#password", "password")
            await tab.click("dialog form button[type=submit]")
            user = await tab.wait_for("document.readyState === 'complete' && "
                                      "document.querySelector('p.user')?.textContent", "the page signed in")
            after = await tab.js(READ_STARS)
            height = await tab.js("document.documentElement.scrollHeight")
            await tab.send("Emulation.setDeviceMetricsOverride", width=WIDTH, height=height, deviceScaleFactor=1,
                           mobile=False)
            shot = await tab.send("Page.captureScreenshot", format="png")
            screenshot.write_bytes(base64.b64decode(shot["data"]))
            return {"before": before, "user": user, "after": after, "url": await tab.js("location.href")}


def test_jason_sees_black_stars_in_chromium(demo: Demo, tmp_path: Path) -> None:
    browser = Chromium(tmp_path / "profile")
    screenshot = artifacts_dir() / "productpage-jason.png"
    screenshot.unlink(missing_ok=True)
    try:
        port = browser.devtools_port()
        page_url = f"http://127.0.0.1:{demo.ingress_port}/productpage"
        seen = asyncio.run(sign_in_as_jason(port, page_url, screenshot))
    finally:
        browser.close()

    # signed out: reviews v1, no stars
    assert len(seen["before"]) == 2, seen
    for review in seen["before"]:
        assert review["servedBy"] == "Reviews served by: reviews-v1-0" and not review["filled"], review
    # the form posted to /login through the ingress, which sent the browser back to the page, signed in
    assert seen["user"] == "jason" and seen["url"] == page_url, seen
    # signed in as jason: reviews v2, 5 and 4 black stars out of 5, drawn on screen
    assert [len(review["filled"]) for review in seen["after"]] == [5, 4], seen
    assert [review["empty"] for review in seen["after"]] == [0, 1], seen
    for review in seen["after"]:
        assert review["servedBy"] == "Reviews served by: reviews-v2-0" and review["ratingError"] is None, review
        for star in review["filled"]:
            assert star["color"] == BLACK and star["fill"] == BLACK, star
            assert star["width"] >= 10 and star["height"] >= 10, star
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 10_000
