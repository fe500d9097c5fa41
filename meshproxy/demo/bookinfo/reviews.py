"""reviews: two book reviews, with stars from ratings in v2 (black) and v3 (red) (Java `LibertyRestEndpoint`)."""

import json
import re
from typing import Any, Final

from aiohttp import web

from meshproxy.demo.bookinfo.common import (
    CLIENT,
    PROPAGATED_HEADERS,
    AppConfig,
    add_client,
    copy_headers,
    service_url,
)

# version → STAR_COLOR, or None where ENABLE_RATINGS=false (v1 never calls ratings).
STAR_COLORS: Final[dict[str, str | None]] = {"v1": None, "v2": "black", "v3": "red"}
RATINGS_UNAVAILABLE: Final = "Ratings service is currently unavailable"
REVIEWS: Final = (
    ("Reviewer1", "An extremely entertaining play by Shakespeare. The slapstick humour is refreshing!"),
    (
        "Reviewer2",
        "Absolutely fun and entertaining. The play lacks thematic depth when compared to other plays by Shakespeare.",
    ),
)
NO_STARS: Final = -1  # the Java code's "no rating" marker (so a stored rating of -1 also reads as unavailable)
_JAVA_INT: Final = re.compile(r"[+-]?\d+")


def ratings_timeout(color: str | None) -> float:
    """The original's connect and receive timeout: 10 s for black stars (v2), 2.5 s otherwise (v3)."""
    return 10.0 if color == "black" else 2.5


def java_int(text: str) -> int | None:
    """A JAX-RS `int` path parameter (Integer.valueOf); None where JAX-RS answers 404."""
    if not _JAVA_INT.fullmatch(text):
        return None
    value = int(text)
    return value if -(2**31) <= value < 2**31 else None


def stars_of(ratings_reply: Any, reviewer: str) -> int:
    """Stars for `reviewer` from the ratings JSON. A reply that is not an object, or a rating that is not a
    number, raises, as JsonObject.getJsonObject/getInt throw in the original (reviews then answers 500)."""
    if not isinstance(ratings_reply, dict):
        raise TypeError("ratings reply is not a JSON object")
    if "ratings" not in ratings_reply:
        return NO_STARS
    ratings = ratings_reply["ratings"]
    if not isinstance(ratings, dict):
        raise TypeError("ratings is not a JSON object")
    if reviewer not in ratings:
        return NO_STARS
    stars = ratings[reviewer]
    if isinstance(stars, bool) or not isinstance(stars, int | float):
        raise TypeError(f"rating of {reviewer} is not a number")
    return int(stars)


def _quoted(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def reviews_body(product_id: int, config: AppConfig, color: str | None, stars: dict[str, int]) -> bytes:
    """The reply byte for byte: the original concatenates strings, spacing included."""
    items = []
    for reviewer, text in REVIEWS:
        item = f'{{  "reviewer": {_quoted(reviewer)},  "text": {_quoted(text)}'
        if color is not None:
            count = stars.get(reviewer, NO_STARS)
            if count != NO_STARS:
                item += f', "rating": {{"stars": {count}, "color": {_quoted(color)}}}'
            else:
                item += f', "rating": {{"error": {_quoted(RATINGS_UNAVAILABLE)}}}'
        items.append(item + "}")
    cluster = "null" if config.cluster_name is None else config.cluster_name  # Java's "" + null is "null"
    return (
        f'{{"id": "{product_id}","podname": {_quoted(config.pod_name)},"clustername": {_quoted(cluster)},'
        f'"reviews": [{",".join(items)}]}}'
    ).encode()


def make_app(config: AppConfig) -> web.Application:
    try:
        color = STAR_COLORS[config.version]
    except KeyError:
        raise ValueError(f"reviews has versions {sorted(STAR_COLORS)}, not {config.version!r}") from None
    timeout = ratings_timeout(color) if config.timeout is None else config.timeout
    app = web.Application()
    if color is not None:
        add_client(app, config.outbound)

    async def health(request: web.Request) -> web.Response:
        return web.Response(body=b'{"status": "Reviews is healthy"}', content_type="application/json")

    async def fetch_stars(product_id: int, request: web.Request) -> dict[str, int]:
        headers = copy_headers(request.headers, PROPAGATED_HEADERS)
        headers["Accept"] = "application/json"
        reply = await request.app[CLIENT].get(service_url("ratings", f"/ratings/{product_id}"), headers, timeout)
        if reply is None or reply.status != 200:  # no retry: one attempt, any failure means "unavailable"
            return {}
        ratings = json.loads(reply.body)
        return {reviewer: stars_of(ratings, reviewer) for reviewer, _ in REVIEWS}

    async def reviews(request: web.Request) -> web.Response:
        product_id = java_int(request.match_info["product_id"])
        if product_id is None:
            raise web.HTTPNotFound()
        stars = await fetch_stars(product_id, request) if color is not None else {}
        body = reviews_body(product_id, config, color, stars)
        return web.Response(body=body, content_type="application/json")  # always 200

    app.router.add_get("/health", health)
    app.router.add_get("/reviews/{product_id}", reviews)
    return app
