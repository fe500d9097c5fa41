"""The Bookinfo apps over real loopback HTTP, wired to each other by Outbound(addresses=...), no mesh.

Each test runs its own event loop (asyncio.run) and starts what it needs on 127.0.0.1 port 0.
"""

import asyncio
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import aiohttp
from aiohttp import web

from meshproxy.demo.bookinfo import make_app
from meshproxy.demo.bookinfo.common import AppConfig, Outbound

SECRET = b"test-secret"
DETAILS_JSON = (
    b'{"id":0,"author":"William Shakespeare","year":1595,"type":"paperback","pages":200,'
    b'"publisher":"PublisherA","language":"English","ISBN-10":"1234567890","ISBN-13":"123-1234567890"}'
)
REVIEWS_DOWN = "Sorry, product reviews are currently unavailable for this book."
RATINGS_DOWN = "Ratings service is currently unavailable"


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    """Serve `app` on a free loopback port; yields its "host:port"."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        yield f"{host}:{port}"
    finally:
        await runner.cleanup()


class Bookinfo:
    """Starts Bookinfo apps and helpers inside one exit stack, and a client to call them."""

    def __init__(self, stack: AsyncExitStack, http: aiohttp.ClientSession) -> None:
        self.stack = stack
        self.http = http

    async def start(self, service: str, version: str = "v1", *, timeout: float | None = None, **peers: str) -> str:
        config = AppConfig(
            service=service,
            version=version,
            pod_name=f"{service}-{version}-pod",
            outbound=Outbound(addresses=peers),
            timeout=timeout,
            session_secret=SECRET,
        )
        return await self.stack.enter_async_context(serving(make_app(config)))

    async def recorder(self, status: int = 200, body: Any = None) -> "Recorder":
        recorder = Recorder(status, body)
        recorder.address = await self.stack.enter_async_context(serving(recorder.app()))
        return recorder

    async def raw(self, respond: Callable[[bytes], bytes | None]) -> "RawUpstream":
        upstream = RawUpstream(respond)
        server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
        self.stack.push_async_callback(upstream.close, server)
        upstream.address = "127.0.0.1:%d" % server.sockets[0].getsockname()[1]
        return upstream

    async def get(self, address: str, path: str, **kwargs: Any) -> tuple[aiohttp.ClientResponse, str]:
        async with self.http.get(f"http://{address}{path}", **kwargs) as response:
            return response, await response.text()


def bookinfo_test(test: Callable[[Bookinfo], Awaitable[None]]) -> Callable[[], None]:
    """Run `test` in its own event loop; everything it started is stopped when it returns."""

    async def run_test() -> None:
        async with AsyncExitStack() as stack:
            http = await stack.enter_async_context(aiohttp.ClientSession())
            await test(Bookinfo(stack, http))

    def run() -> None:  # not functools.wraps: pytest would then ask for a `bi` fixture
        asyncio.run(run_test())

    run.__name__ = run.__qualname__ = test.__name__
    run.__doc__ = test.__doc__
    return run


class Recorder:
    """An upstream that answers every request with one status and JSON body, keeping each request's headers."""

    def __init__(self, status: int, body: Any) -> None:
        self.status, self.body = status, body
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.address = ""

    def app(self) -> web.Application:
        async def record(request: web.Request) -> web.Response:
            self.requests.append((request.path, {k.lower(): v for k, v in request.headers.items()}))
            return web.json_response(self.body, status=self.status)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", record)
        return app


class RawUpstream:
    """A bare TCP upstream: records each request head, then answers `respond(head)`, or stays silent on None."""

    def __init__(self, respond: Callable[[bytes], bytes | None]) -> None:
        self.respond = respond
        self.heads: list[bytes] = []
        self.address = ""
        self._writers: set[asyncio.StreamWriter] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.heads.append(head)
            reply = self.respond(head)
            if reply is None:
                await reader.read()  # until the client gives up and closes
            else:
                writer.write(reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self._writers.discard(writer)

    async def close(self, server: asyncio.Server) -> None:
        server.close()
        for writer in list(self._writers):
            writer.close()
        await server.wait_closed()
        await asyncio.sleep(0)  # let the handlers see their closed streams


def http_reply(body: bytes, status: str = "200 OK") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body


def refused_address() -> str:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return "127.0.0.1:%d" % probe.getsockname()[1]


def star_counts(page: str) -> tuple[int, int]:
    return len(re.findall(r'<svg class="star-filled ', page)), page.count('<svg class="star-empty"')


# --- details -------------------------------------------------------------------------------------------------


@bookinfo_test
async def test_details_answers_the_original_json(bi: Bookinfo) -> None:
    details = await bi.start("details")
    response, body = await bi.get(details, "/details/0")
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/json"
    assert body.encode() == DETAILS_JSON

    response, body = await bi.get(details, "/details/abc")
    assert (response.status, body) == (400, '{"error":"please provide numeric product id"}')

    response, body = await bi.get(details, "/health")
    assert (response.status, body) == (200, '{"status":"Details is healthy"}')


# --- ratings -------------------------------------------------------------------------------------------------


@bookinfo_test
async def test_ratings_get_and_post(bi: Bookinfo) -> None:
    ratings = await bi.start("ratings")
    response, body = await bi.get(ratings, "/ratings/0")
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/json"
    assert body == '{"id":0,"ratings":{"Reviewer1":5,"Reviewer2":4}}'

    async with bi.http.post(f"http://{ratings}/ratings/7", data=b'{"Reviewer1":1,"Reviewer2":2}') as response:
        assert (response.status, await response.text()) == (200, '{"id":7,"ratings":{"Reviewer1":1,"Reviewer2":2}}')
    _, body = await bi.get(ratings, "/ratings/7")
    assert body == '{"id":7,"ratings":{"Reviewer1":1,"Reviewer2":2}}'
    _, body = await bi.get(ratings, "/ratings/0")
    assert body == '{"id":0,"ratings":{"Reviewer1":5,"Reviewer2":4}}'

    async with bi.http.post(f"http://{ratings}/ratings/7", data=b"{not json") as response:
        assert (response.status, await response.text()) == (400, '{"error":"please provide valid ratings JSON"}')
    response, body = await bi.get(ratings, "/ratings/abc")
    assert (response.status, body) == (400, '{"error":"please provide numeric product ID"}')
    response, body = await bi.get(ratings, "/health")
    assert (response.status, body) == (200, '{"status":"Ratings is healthy"}')


# --- reviews -------------------------------------------------------------------------------------------------


@bookinfo_test
async def test_reviews_v1_has_no_rating_and_never_calls_ratings(bi: Bookinfo) -> None:
    ratings = await bi.recorder(body={"id": 0, "ratings": {"Reviewer1": 5, "Reviewer2": 4}})
    reviews = await bi.start("reviews", "v1", ratings=ratings.address)
    response, body = await bi.get(reviews, "/reviews/0")
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/json"
    assert body == (
        '{"id": "0","podname": "reviews-v1-pod","clustername": "null","reviews": ['
        '{  "reviewer": "Reviewer1",  "text": "An extremely entertaining play by Shakespeare. '
        'The slapstick humour is refreshing!"},'
        '{  "reviewer": "Reviewer2",  "text": "Absolutely fun and entertaining. '
        'The play lacks thematic depth when compared to other plays by Shakespeare."}]}'
    )
    assert ratings.requests == []
    response, body = await bi.get(reviews, "/health")
    assert (response.status, body) == (200, '{"status": "Reviews is healthy"}')


@bookinfo_test
async def test_reviews_v2_black_and_v3_red_stars_from_ratings(bi: Bookinfo) -> None:
    ratings = await bi.start("ratings")
    for version, colour in (("v2", "black"), ("v3", "red")):
        reviews = await bi.start("reviews", version, ratings=ratings)
        _, body = await bi.get(reviews, "/reviews/0")
        document = json.loads(body)
        assert [review["rating"] for review in document["reviews"]] == [
            {"stars": 5, "color": colour},
            {"stars": 4, "color": colour},
        ]
        assert list(document) == ["id", "podname", "clustername", "reviews"]


@bookinfo_test
async def test_reviews_show_ratings_unavailable_when_ratings_fails(bi: Bookinfo) -> None:
    silent = await bi.raw(lambda head: None)
    failing = await bi.recorder(status=500, body={"error": "boom"})
    cases = [("v2", refused_address()), ("v3", silent.address), ("v2", failing.address)]
    for version, ratings in cases:
        reviews = await bi.start("reviews", version, timeout=0.2, ratings=ratings)
        response, body = await bi.get(reviews, "/reviews/0")
        assert response.status == 200  # reviews always answers 200
        ratings_shown = [review["rating"] for review in json.loads(body)["reviews"]]
        assert ratings_shown == [{"error": RATINGS_DOWN}, {"error": RATINGS_DOWN}], (version, ratings)


@bookinfo_test
async def test_reviews_forwards_tracing_headers_and_end_user_to_ratings(bi: Bookinfo) -> None:
    ratings = await bi.recorder(body={"id": 0, "ratings": {"Reviewer1": 3}})
    reviews = await bi.start("reviews", "v2", ratings=ratings.address)
    incoming = {
        "x-request-id": "rid-1",
        "x-b3-traceid": "463ac35c9f6413ad",
        "x-b3-spanid": "a2fb4a1d1a96d312",
        "x-b3-parentspanid": "0020000000000001",
        "x-b3-sampled": "1",
        "x-b3-flags": "1",
        "end-user": "jason",
        "x-not-forwarded": "x",
    }
    _, body = await bi.get(reviews, "/reviews/0", headers=incoming)
    path, seen = ratings.requests[0]
    assert path == "/ratings/0"
    assert {name: seen.get(name) for name in incoming} == {**incoming, "x-not-forwarded": None}
    assert seen["accept"] == "application/json"
    assert seen["host"] == "ratings:9080"
    # Reviewer2 is missing from this ratings reply: that review shows the error.
    assert [review["rating"] for review in json.loads(body)["reviews"]] == [
        {"stars": 3, "color": "black"},
        {"error": RATINGS_DOWN},
    ]


# --- productpage ---------------------------------------------------------------------------------------------


async def start_bookinfo(bi: Bookinfo, reviews_version: str) -> str:
    ratings = await bi.start("ratings")
    details = await bi.start("details")
    reviews = await bi.start("reviews", reviews_version, ratings=ratings)
    return await bi.start("productpage", details=details, reviews=reviews, ratings=ratings)


@bookinfo_test
async def test_productpage_renders_book_details_and_reviews(bi: Bookinfo) -> None:
    for version, colour, stars in (("v1", None, (0, 0)), ("v2", "black", (9, 1)), ("v3", "red", (9, 1))):
        productpage = await start_bookinfo(bi, version)
        response, page = await bi.get(productpage, "/productpage")
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/html")
        assert "The Comedy of Errors" in page
        assert "<h4>Book Details</h4>" in page
        for value in ("1234567890", "PublisherA", "200", "paperback", "English"):
            assert f"<td>{value}</td>" in page
        assert page.count('<section class="review">') == 2
        assert "Reviewer1" in page and "Reviewer2" in page
        assert "An extremely entertaining play by Shakespeare" in page
        assert f"Reviews served by: reviews-{version}-pod" in page
        assert "on cluster" not in page  # clustername "null"
        assert star_counts(page) == stars, version
        if colour:
            assert page.count(f'<svg class="star-filled text-{colour}-500"') == 9
        assert "Sign in" in page and "Sign out" not in page
        assert '<form method="post" action="login"' in page and 'name="passwd"' in page
        assert "<link" not in page and "<script src" not in page  # self-contained


@bookinfo_test
async def test_productpage_shows_ratings_error_from_reviews(bi: Bookinfo) -> None:
    details = await bi.start("details")
    reviews = await bi.start("reviews", "v3", ratings=refused_address())
    productpage = await bi.start("productpage", details=details, reviews=reviews)
    _, page = await bi.get(productpage, "/productpage")
    assert page.count(RATINGS_DOWN) == 2
    assert star_counts(page) == (0, 0)


@bookinfo_test
async def test_productpage_when_reviews_and_details_fail(bi: Bookinfo) -> None:
    productpage = await bi.start("productpage", details=refused_address(), reviews=refused_address())
    response, page = await bi.get(productpage, "/productpage")
    assert response.status == 200  # the page itself never fails
    assert "Error fetching product details" in page
    assert "Sorry, product details are currently unavailable for this book." in page
    assert "Error fetching product reviews" in page
    assert REVIEWS_DOWN in page
    assert "<h4>Book Reviews</h4>" not in page and 'class="review"' not in page


@bookinfo_test
async def test_login_sends_end_user_to_reviews_and_shows_the_user(bi: Bookinfo) -> None:
    details = await bi.start("details")
    reviews = await bi.recorder(body={"id": "0", "podname": "p", "clustername": "null", "reviews": []})
    productpage = await bi.start("productpage", details=details, reviews=reviews.address)
    page_url = f"http://{productpage}/productpage"

    async with bi.http.post(
        f"http://{productpage}/login",
        data={"username": "jason", "passwd": "x"},
        headers={"Referer": page_url},
        allow_redirects=False,
    ) as response:
        assert response.status == 302
        assert response.headers["Location"] == page_url
        cookie = response.cookies["session"]
        assert cookie["httponly"] and cookie["path"] == "/"
    session = cookie.value

    _, page = await bi.get(productpage, "/productpage", headers={"Cookie": f"session={session}"})
    assert reviews.requests[-1][1]["end-user"] == "jason"
    assert '<p class="user">jason</p>' in page and "Sign out" in page

    # No session: no end-user, even when the client sends one itself.
    await bi.get(productpage, "/productpage", headers={"end-user": "jason"})
    assert "end-user" not in reviews.requests[-1][1]

    # A session edited by the client is not trusted.
    forged = session.replace(session.split(".")[0], "eyJ1c2VyIjogImFkbWluIn0")  # {"user": "admin"}
    _, page = await bi.get(productpage, "/productpage", headers={"Cookie": f"session={forged}"})
    assert "end-user" not in reviews.requests[-1][1]
    assert "Sign out" not in page

    async with bi.http.get(
        f"http://{productpage}/logout",
        headers={"Cookie": f"session={session}", "Referer": page_url},
        allow_redirects=False,
    ) as response:
        assert (response.status, response.headers["Location"]) == (302, page_url)
        assert response.cookies["session"].value == ""


@bookinfo_test
async def test_productpage_forwards_request_id_and_reencoded_b3(bi: Bookinfo) -> None:
    details = await bi.recorder(body=json.loads(DETAILS_JSON))
    reviews = await bi.recorder(body={"id": "0", "podname": "p", "clustername": "null", "reviews": []})
    productpage = await bi.start("productpage", details=details.address, reviews=reviews.address)
    incoming = {
        "x-request-id": "3f1c9f1e-1b2c-4c1d-9a7e-5b6f0e2d8c11",
        "x-b3-traceid": "463AC35C9F6413AD",  # 64-bit id: re-sent padded to 128 bits, lower-case
        "x-b3-spanid": "A2FB4A1D1A96D312",
        "x-b3-parentspanid": "0020000000000001",
        "x-b3-sampled": "true",
        "x-b3-flags": "1",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "user-agent": "bookinfo-test",
        "x-custom": "not forwarded",
    }
    await bi.get(productpage, "/productpage", headers=incoming)
    for upstream, path in ((details, "/details/0"), (reviews, "/reviews/0")):
        seen_path, seen = upstream.requests[-1]
        assert seen_path == path
        assert seen["host"] == path.split("/")[1] + ":9080"
        assert seen["x-request-id"] == incoming["x-request-id"]
        assert seen["x-b3-traceid"] == "0000000000000000463ac35c9f6413ad"
        assert seen["x-b3-spanid"] == "a2fb4a1d1a96d312"
        assert seen["x-b3-sampled"] == "1"
        assert "x-b3-parentspanid" not in seen and "x-b3-flags" not in seen
        assert seen["traceparent"] == incoming["traceparent"]
        assert seen["user-agent"] == "bookinfo-test"
        assert "x-custom" not in seen

    # Sampling comes from x-b3-flags too; the single b3 header is read first when present.
    await bi.get(productpage, "/productpage", headers={**incoming, "x-b3-sampled": "0"})
    assert reviews.requests[-1][1]["x-b3-sampled"] == "1"
    single = {"b3": "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-0-05e3ac9a4f6e3b90"}
    await bi.get(productpage, "/productpage", headers=single)
    seen = reviews.requests[-1][1]
    assert (seen["x-b3-traceid"], seen["x-b3-spanid"], seen["x-b3-sampled"]) == (
        "80f198ee56343ba864fe8b2a57d3eff7",
        "e457b5a2e4d86bd1",
        "0",
    )

    # Ids that are not valid hex of the right length: no B3 at all.
    await bi.get(productpage, "/productpage", headers={"x-b3-traceid": "xyz", "x-b3-spanid": "a2fb4a1d1a96d312"})
    assert not any(name.startswith("x-b3-") for name in reviews.requests[-1][1])


@bookinfo_test
async def test_productpage_tries_reviews_twice_with_a_per_attempt_timeout(bi: Bookinfo) -> None:
    details = await bi.start("details")
    silent = await bi.raw(lambda head: None)
    productpage = await bi.start("productpage", timeout=0.25, details=details, reviews=silent.address)
    started = time.monotonic()
    response, page = await bi.get(productpage, "/productpage")
    elapsed = time.monotonic() - started
    assert response.status == 200
    assert len(silent.heads) == 2
    assert all(head.startswith(b"GET /reviews/0 HTTP/1.1\r\n") for head in silent.heads)
    assert 0.45 <= elapsed < 10.0  # two tries of 0.25 s, then the page; the silent reviews would hang for ever
    assert "Error fetching product reviews" in page and REVIEWS_DOWN in page
    assert "<h4>Book Details</h4>" in page  # details answered in time


@bookinfo_test
async def test_productpage_retries_reviews_once_on_an_error_status(bi: Bookinfo) -> None:
    reviews = await bi.recorder(status=503, body={"error": "unavailable"})
    productpage = await bi.start("productpage", details=refused_address(), reviews=reviews.address)
    response, body = await bi.get(productpage, "/api/v1/products/0/reviews")
    assert len(reviews.requests) == 2
    assert (response.status, body) == (503, json.dumps({"error": REVIEWS_DOWN}))
    assert response.headers["Content-Type"] == "application/json"


@bookinfo_test
async def test_productpage_api_and_plain_routes(bi: Bookinfo) -> None:
    productpage = await start_bookinfo(bi, "v2")
    response, body = await bi.get(productpage, "/api/v1/products")
    assert response.status == 200
    products = json.loads(body)
    assert [(product["id"], product["title"]) for product in products] == [(0, "The Comedy of Errors")]
    assert body.startswith('[{"id": 0, "title": "The Comedy of Errors", "descriptionHtml": "<a href=')

    response, body = await bi.get(productpage, "/api/v1/products/0")
    assert (response.status, body) == (200, json.dumps(json.loads(DETAILS_JSON)))  # re-serialised by Python
    response, body = await bi.get(productpage, "/api/v1/products/0/reviews")
    assert response.status == 200 and json.loads(body)["reviews"][0]["rating"] == {"stars": 5, "color": "black"}
    response, body = await bi.get(productpage, "/api/v1/products/0/ratings")
    assert (response.status, body) == (200, json.dumps({"id": 0, "ratings": {"Reviewer1": 5, "Reviewer2": 4}}))

    response, body = await bi.get(productpage, "/health")
    assert (response.status, body) == (200, "Product page is healthy")
    for path in ("/", "/index.html"):
        response, body = await bi.get(productpage, path)
        assert response.status == 200
        assert 'href="/productpage?u=normal"' in body and 'href="/productpage?u=test"' in body


@bookinfo_test
async def test_productpage_keeps_the_details_error_status_on_the_api(bi: Bookinfo) -> None:
    details = await bi.recorder(status=555, body={"error": "fault filter abort"})
    productpage = await bi.start("productpage", details=details.address, reviews=refused_address())
    response, body = await bi.get(productpage, "/api/v1/products/0")
    assert (response.status, json.loads(body)) == (
        555,
        {"error": "Sorry, product details are currently unavailable for this book."},
    )
    response, body = await bi.get(productpage, "/api/v1/products/0/ratings")  # no ratings reachable: 500
    assert (response.status, json.loads(body)) == (
        500,
        {"error": "Sorry, product ratings are currently unavailable for this book."},
    )
    response, page = await bi.get(productpage, "/productpage")
    assert response.status == 200 and "Error fetching product details" in page


@bookinfo_test
async def test_calls_go_through_the_sidecar_proxy_in_absolute_form(bi: Bookinfo) -> None:
    def sidecar(head: bytes) -> bytes:
        if head.startswith(b"GET http://details:9080/details/0 HTTP/1.1\r\n"):
            return http_reply(DETAILS_JSON)
        return http_reply(b'{"error": "no route"}', "404 Not Found")

    proxy = await bi.raw(sidecar)
    config = AppConfig(
        service="productpage", outbound=Outbound(proxy=f"http://{proxy.address}"), session_secret=SECRET
    )
    productpage = await bi.stack.enter_async_context(serving(make_app(config)))
    _, page = await bi.get(productpage, "/productpage")
    request_lines = [head.split(b"\r\n", 1)[0] for head in proxy.heads]
    assert request_lines == [
        b"GET http://details:9080/details/0 HTTP/1.1",
        b"GET http://reviews:9080/reviews/0 HTTP/1.1",
        b"GET http://reviews:9080/reviews/0 HTTP/1.1",
    ]
    assert all(b"\r\nHost: details:9080\r\n" in head for head in proxy.heads[:1])
    assert "<td>PublisherA</td>" in page and "Error fetching product reviews" in page
