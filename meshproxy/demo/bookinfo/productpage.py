"""productpage: the Bookinfo front end (Flask `productpage.py` in Istio).

GET /productpage calls details, then reviews (2 attempts), and always answers 200 with the page; the JSON API
passes the upstream's status through. Login keeps the user in a signed `session` cookie; that user goes to
reviews as `end-user`, which is what the reviews-test-v2 and ratings fault rules match on.
"""

import base64
import hashlib
import hmac
import json
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from html import escape
from typing import Any, Final

from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import CIMultiDictProxy

from meshproxy.demo.bookinfo.common import (
    CLIENT,
    PRODUCTPAGE_FORWARDED_HEADERS,
    AppConfig,
    HttpClient,
    Reply,
    add_client,
    copy_headers,
    json_response,
    service_url,
)

DEFAULT_TIMEOUT: Final = 3.0  # requests.get(timeout=3.0) on every call
REVIEWS_ATTEMPTS: Final = 2  # deliberate in the original, for the fault-injection task ("3s + 1 retry")
SESSION_COOKIE: Final = "session"

PRODUCTS: Final = (
    {
        "id": 0,
        "title": "The Comedy of Errors",
        "descriptionHtml": '<a href="https://en.wikipedia.org/wiki/The_Comedy_of_Errors">Wikipedia Summary</a>: '
        "The Comedy of Errors is one of <b>William Shakespeare's</b> early plays. It is his shortest and one of "
        "his most farcical comedies, with a major part of the humour coming from slapstick and mistaken "
        "identity, in addition to puns and word play.",
    },
)


def _service_node(name: str, children: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": service_url(name, ""), "endpoint": name, "children": children}


_RATINGS_NODE: Final = _service_node("ratings", [])
# The landing page's tree. The root names details, not productpage: that slip is in the original too.
SERVICE_TREE: Final = _service_node(
    "details", [_service_node("details", []), _service_node("reviews", [_RATINGS_NODE])]
)

# --- tracing headers ---------------------------------------------------------------------------------------

_B3_TRACE_ID: Final = re.compile(r"[0-9a-fA-F]{16}|[0-9a-fA-F]{32}")
_B3_SPAN_ID: Final = re.compile(r"[0-9a-fA-F]{16}")
_B3_SAMPLED: Final = frozenset({"1", "True", "true", "d"})


def b3_headers(incoming: CIMultiDictProxy[str]) -> dict[str, str]:
    """The B3 headers productpage sends: OpenTelemetry's B3MultiFormat extract then inject.

    Reads the single `b3` header if present, else the x-b3-* headers; writes trace id (32 lower-hex), span id
    and sampled 1/0. x-b3-parentspanid and x-b3-flags are dropped; invalid or missing ids send no B3 at all."""
    trace_id = span_id = ""
    sampled, flags = "0", ""
    single = incoming.get("b3")
    if single:
        sampled = "1"  # b3 "deferred" sampling is recorded as sampled
        fields = single.split("-", 4)
        if len(fields) == 1:
            sampled = fields[0]
        elif len(fields) in (2, 3, 4):
            trace_id, span_id = fields[0], fields[1]
            sampled = fields[2] if len(fields) > 2 else sampled
    else:
        trace_id = incoming.get("x-b3-traceid", "")
        span_id = incoming.get("x-b3-spanid", "")
        sampled = incoming.get("x-b3-sampled") or "0"
        flags = incoming.get("x-b3-flags", "")
    if not (_B3_TRACE_ID.fullmatch(trace_id) and _B3_SPAN_ID.fullmatch(span_id)):
        return {}
    return {
        "x-b3-traceid": f"{int(trace_id, 16):032x}",
        "x-b3-spanid": f"{int(span_id, 16):016x}",
        "x-b3-sampled": "1" if sampled in _B3_SAMPLED or flags == "1" else "0",
    }


def forward_headers(request: web.Request, user: str | None) -> dict[str, str]:
    headers = b3_headers(request.headers)
    if user is not None:
        headers["end-user"] = user  # from the session only; an incoming end-user header is not passed on
    headers.update(copy_headers(request.headers, PRODUCTPAGE_FORWARDED_HEADERS))
    return headers


# --- session ------------------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _signature(secret: bytes, payload: str) -> str:
    return _b64(hmac.new(secret, payload.encode(), hashlib.sha256).digest())


def session_cookie(secret: bytes, user: str) -> str:
    """`<base64url JSON>.<base64url HMAC-SHA256>`: readable like Flask's session, not forgeable without secret."""
    payload = _b64(json.dumps({"user": user}).encode())
    return f"{payload}.{_signature(secret, payload)}"


def session_user(secret: bytes, cookie: str | None) -> str | None:
    """The user in a session cookie, or None when absent, malformed or not signed with `secret`."""
    if not cookie:
        return None
    payload, _, signature = cookie.rpartition(".")
    if not hmac.compare_digest(signature.encode(), _signature(secret, payload).encode()):
        return None
    try:
        session = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except ValueError:
        return None
    user = session.get("user") if isinstance(session, dict) else None
    return user if isinstance(user, str) else None


# --- outbound calls -----------------------------------------------------------------------------------------

Fetched = tuple[int, Any]  # (status, JSON body) as the original hands them to the page or the API


def _outcome(reply: Reply | None, what: str) -> Fetched:
    """(status, JSON) as the original returns them: the upstream's status is kept on failure, 500 without a
    reply, and the body becomes the 'Sorry, ...' error object."""
    if reply is not None and reply.status == 200:
        try:
            return 200, json.loads(reply.body)
        except ValueError:  # the original fails the whole request here; count it as a failed call
            reply = Reply(500, b"")
    status = reply.status if reply is not None else 500
    return status, {"error": f"Sorry, product {what} are currently unavailable for this book."}


async def fetch_details(client: HttpClient, product_id: object, headers: Mapping[str, str], timeout: float) -> Fetched:
    reply = await client.get(service_url("details", f"/details/{product_id}"), headers, timeout)
    return _outcome(reply, "details")


async def fetch_reviews(client: HttpClient, product_id: object, headers: Mapping[str, str], timeout: float) -> Fetched:
    url = service_url("reviews", f"/reviews/{product_id}")
    reply = None
    for _ in range(REVIEWS_ATTEMPTS):  # retried at once on any failure or non-200
        reply = await client.get(url, headers, timeout)
        if reply is not None and reply.status == 200:
            break
    return _outcome(reply, "reviews")


async def fetch_ratings(client: HttpClient, product_id: object, headers: Mapping[str, str], timeout: float) -> Fetched:
    reply = await client.get(service_url("ratings", f"/ratings/{product_id}"), headers, timeout)
    return _outcome(reply, "ratings")


# --- pages --------------------------------------------------------------------------------------------------

# Self-contained (the demo machine has no internet). Colours are inline styles, so class names such as
# text-red-500 appear in the page only where the original puts them on an element.
_STYLE: Final = """
*{box-sizing:border-box}body{margin:0;font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
color:#111827;background:#fff;line-height:1.5}a{color:#2563eb;text-decoration:none}a:hover{color:#1d4ed8}
.container{max-width:72rem;margin:0 auto;padding:0 1.5rem}
nav{background:#1f2937}nav .container{display:flex;height:4rem;align-items:center;justify-content:space-between}
nav .brand{color:#fff;font-size:1.125rem;font-weight:500}nav .who{color:#f9fafb;text-align:right}
nav .who p{margin:0;font-weight:500}nav .who a{color:#9ca3af;font-size:.75rem}
button{cursor:pointer;border:0;border-radius:.375rem;background:#2563eb;color:#fff;font-weight:600;
padding:.6rem .9rem;font-size:.875rem}button:hover{background:#3b82f6}
dialog{border:1px solid #e5e7eb;border-radius:.375rem;box-shadow:0 20px 25px -5px rgba(0,0,0,.1);
width:min(28rem,90vw);padding:2.5rem}dialog h2{text-align:center;margin-top:0}
dialog label{display:block;font-size:.875rem;font-weight:500;margin-top:1rem}
dialog input{display:block;width:100%;padding:.4rem .75rem;margin-top:.4rem;border:1px solid #d1d5db;
border-radius:.375rem}dialog form button{width:100%;margin-top:1.5rem}
dialog .close{position:absolute;right:1rem;top:1rem;background:none;color:#9ca3af;padding:0}
h1{font-size:3rem;font-weight:700;letter-spacing:-.025em;color:#1e3a8a;margin:2rem 0 0}
.description{font-size:1.25rem;color:#4b5563;max-width:56rem;margin-top:1.5rem}
h4{font-size:1.875rem;font-weight:600;margin:0 0 1rem}
table{border-collapse:collapse;min-width:36rem}th,td{text-align:left;padding:.6rem .5rem;font-size:.875rem}
thead th{border-bottom:1px solid #d1d5db}tbody td{color:#6b7280}
.details{padding:2.5rem 0}.error{font-size:1.5rem}.error-text{font-size:1.125rem;color:#4b5563}
.reviews-band{background:rgba(37,99,235,.05);padding:3rem 0}
.reviews{display:flex;flex-wrap:wrap;gap:2rem}.reviews>section{flex:1 1 20rem;padding:1rem 1.5rem}
.stars{display:flex;gap:.25rem}.stars svg{width:1.25rem;height:1.25rem;flex:none}
blockquote{margin:1.5rem 0 0;font-size:1.375rem;font-weight:600;line-height:1.6}
.reviewer{font-weight:600;margin-top:1rem;font-size:.875rem}
.served-by{color:#4b5563;font-family:ui-monospace,monospace;font-size:.875rem}
.tree table{border:1px solid #d1d5db;margin:.25rem 0}.tree th,.tree td{border:1px solid #d1d5db;color:#111827}
"""

_DIALOG_SCRIPT: Final = """
addEventListener("DOMContentLoaded", () => {
  const dialog = document.querySelector("dialog");
  const open = document.querySelector("#sign-in-button");
  if (open) open.addEventListener("click", () => dialog.showModal());
  document.querySelector("#close-dialog").addEventListener("click", () => dialog.close());
});
"""

_COLOURS: Final = {"black": "#000000", "red": "#ef4444"}
_RED: Final = _COLOURS["red"]


def _star_points(outer: float = 10.0, inner: float = 4.2) -> str:
    """A five-pointed star in a 24×24 box, point up."""
    corners = []
    for i in range(10):
        radius, angle = (outer if i % 2 == 0 else inner), math.radians(-90 + 36 * i)
        corners.append(f"{12 + radius * math.cos(angle):.2f},{12.5 + radius * math.sin(angle):.2f}")
    return " ".join(corners)


_STAR: Final = f'viewBox="0 0 24 24" aria-hidden="true"><polygon points="{_star_points()}"/></svg>'
_EMPTY_STAR: Final = f'<svg class="star-empty" fill="none" stroke="currentColor" stroke-width="1.5" {_STAR}'


def _page(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta name="viewport" content="width=device-width, initial-scale=1.0">\n<title>{title}</title>\n'
        f"<style>{_STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def _stars(rating: Mapping[str, Any]) -> str:
    count, colour = rating["stars"], str(rating.get("color"))
    colour_class = f"text-{escape(colour)}-500"
    style = escape(_COLOURS.get(colour, "currentColor"))
    filled = f'<svg class="star-filled {colour_class}" fill="currentColor" {_STAR}'
    return (
        f'<div class="stars {colour_class}" style="color:{style}">'
        + filled * count
        + _EMPTY_STAR * max(0, 5 - count)
        + "</div>"
    )


def _review(review: Mapping[str, Any], reviews: Mapping[str, Any]) -> str:
    rating = review.get("rating")
    parts = ['<section class="review">']
    if rating:  # like the template: stars when there are some, else the error, else nothing
        if rating.get("stars"):
            parts.append(_stars(rating))
        elif rating.get("error"):
            error = escape(str(rating["error"]))
            parts.append(f'<p class="rating-error text-red-500" style="color:{_RED}">{error}</p>')
    parts.append(f'<blockquote><p>"{escape(str(review.get("text", "")))}"</p></blockquote>')
    parts.append(f'<div class="reviewer">{escape(str(review.get("reviewer", "")))}</div>')
    served_by = f"Reviews served by: {escape(str(reviews.get('podname')))}"
    cluster = reviews.get("clustername")
    if cluster != "null":  # Jinja prints a missing value as None, and so does this
        served_by += f" on cluster {escape(str(cluster))}"
    parts.append(f'<div class="served-by">{served_by}</div>')
    parts.append("</section>")
    return "\n".join(parts)


def _nav(user: str | None) -> str:
    if user:
        who = f'<div class="who"><p class="user">{escape(user)}</p><a href="logout">Sign out</a></div>'
    else:
        who = '<button type="button" id="sign-in-button">Sign in</button>'
    return f'<nav><div class="container"><a class="brand" href="#">BookInfo Sample</a>{who}</div></nav>'


_LOGIN_DIALOG: Final = """<dialog id="dialog">
<button type="button" id="close-dialog" class="close" aria-label="Close">&#x2715;</button>
<h2>Sign in to BookInfo</h2>
<form method="post" action="login" name="login_form">
<label for="username">Username</label><input id="username" name="username" required>
<label for="password">Password</label><input id="password" name="passwd" type="password" required>
<button type="submit">Sign in</button>
</form>
</dialog>"""


def _details_section(status: int, details: Mapping[str, Any]) -> str:
    if status != 200:
        return (
            f'<p class="error text-red-500" style="color:{_RED}">Error fetching product details</p>'
            f'<p class="error-text">{escape(str(details.get("error", "")))}</p>'
        )
    cells = "".join(
        f"<td>{escape(str(details.get(key, '')))}</td>"
        for key in ("ISBN-10", "publisher", "pages", "type", "language")
    )
    return (
        "<h4>Book Details</h4>\n<table><thead><tr><th>ISBN-10</th><th>Publisher</th><th>Pages</th>"
        f"<th>Type</th><th>Language</th></tr></thead>\n<tbody><tr>{cells}</tr></tbody></table>"
    )


def _reviews_section(status: int, reviews: Mapping[str, Any]) -> str:
    if status != 200:
        return (
            f'<p class="error text-red-500" style="color:{_RED}">Error fetching product reviews</p>'
            f'<p class="error-text">{escape(str(reviews.get("error", "")))}</p>'
        )
    blocks = "\n".join(_review(review, reviews) for review in reviews.get("reviews") or ())
    return f'<h4>Book Reviews</h4>\n<div class="reviews">\n{blocks}\n</div>'


def render_product_page(
    user: str | None,
    product: Mapping[str, Any],
    details: Fetched,
    reviews: Fetched,
) -> str:
    body = f"""{_nav(user)}
{_LOGIN_DIALOG}
<script>{_DIALOG_SCRIPT}</script>
<div class="container">
<h1>{escape(product["title"])}</h1>
<p class="description">{product["descriptionHtml"]}</p>
<p><a href="https://istio.io" target="_blank">Learn more about Istio &rarr;</a></p>
<div class="details">
{_details_section(*details)}
</div>
</div>
<div class="reviews-band"><div class="container">
{_reviews_section(*reviews)}
</div></div>"""
    return _page("Simple Bookstore App", body)


def _tree_table(node: Mapping[str, Any]) -> str:
    rows = []
    for key, value in node.items():
        cell = "".join(_tree_table(child) for child in value) if isinstance(value, list) else escape(str(value))
        rows.append(f"<tr><th>{escape(key)}</th><td>{cell}</td></tr>")
    return f"<table>{''.join(rows)}</table>"


def render_index() -> str:
    body = f"""<div class="container">
<h3>Hello! This is a simple bookstore application consisting of three services as shown below</h3>
<div class="tree">{_tree_table(SERVICE_TREE)}</div>
<h4>Click on one of the links below to auto generate a request to the backend as a real user or a tester</h4>
<p><a href="/productpage?u=normal">Normal user</a></p>
<p><a href="/productpage?u=test">Test user</a></p>
</div>"""
    return _page("Simple Bookstore App", body)


def _redirect(location: str) -> web.Response:
    target = escape(location)
    body = (
        '<!doctype html>\n<html lang=en>\n<title>Redirecting...</title>\n<h1>Redirecting...</h1>\n'
        f'<p>You should be redirected automatically to the target URL: <a href="{target}">{target}</a>. '
        "If not, click the link.\n"
    )
    return web.Response(status=302, headers={"Location": location}, text=body, content_type="text/html")


# --- the app ------------------------------------------------------------------------------------------------


def make_app(config: AppConfig) -> web.Application:
    timeout = DEFAULT_TIMEOUT if config.timeout is None else config.timeout
    secret = config.session_secret

    def user_of(request: web.Request) -> str | None:
        return session_user(secret, request.cookies.get(SESSION_COOKIE))

    def back(request: web.Request) -> str:
        # Flask redirects to the Referer; without one the original has no usable target: go to the page.
        return request.headers.get("Referer") or "/productpage"

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=render_index(), content_type="text/html")

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="Product page is healthy", content_type="text/html")

    async def login(request: web.Request) -> web.Response:
        form = await request.post()
        user = request.query.get("username", form.get("username"))  # Flask's request.values: query first
        response = _redirect(back(request))
        if isinstance(user, str):
            response.set_cookie(SESSION_COOKIE, session_cookie(secret, user), httponly=True, path="/")
        return response

    async def logout(request: web.Request) -> web.Response:
        response = _redirect(back(request))
        if user_of(request) is not None:  # Flask drops the cookie once the session is empty
            response.del_cookie(SESSION_COOKIE, path="/")
        return response

    async def product_page(request: web.Request) -> web.Response:
        user = user_of(request)
        headers = forward_headers(request, user)
        client = request.app[CLIENT]
        details = await fetch_details(client, 0, headers, timeout)
        reviews = await fetch_reviews(client, 0, headers, timeout)
        page = render_product_page(user, PRODUCTS[0], details, reviews)
        return web.Response(text=page, content_type="text/html")  # 200 whatever the calls returned

    async def api_products(request: web.Request) -> web.Response:
        return json_response(list(PRODUCTS), compact=False)

    def api_call(fetch: Callable[[HttpClient, str, Mapping[str, str], float], Awaitable[Fetched]]) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            headers = forward_headers(request, user_of(request))
            status, body = await fetch(request.app[CLIENT], request.match_info["product_id"], headers, timeout)
            return json_response(body, status, compact=False)

        return handler

    app = web.Application()
    add_client(app, config.outbound)
    app.router.add_get("/", index)
    app.router.add_get("/index.html", index)
    app.router.add_get("/health", health)
    app.router.add_post("/login", login)
    app.router.add_get("/logout", logout)
    app.router.add_get("/productpage", product_page)
    app.router.add_get("/api/v1/products", api_products)
    app.router.add_get("/api/v1/products/{product_id}", api_call(fetch_details))
    app.router.add_get("/api/v1/products/{product_id}/reviews", api_call(fetch_reviews))
    app.router.add_get("/api/v1/products/{product_id}/ratings", api_call(fetch_ratings))
    return app
