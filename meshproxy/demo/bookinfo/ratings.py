"""ratings: per-reviewer star counts as JSON (Node `ratings.js` in Istio), v1: kept in memory.

Other versions (v2 backed by MongoDB/MySQL, the v-faulty/v-delayed/... test images) are out of scope: every
version answers like v1.
"""

import json
import re
from typing import Any, Final

from aiohttp import web

from meshproxy.demo.bookinfo.common import AppConfig, json_response

NOT_NUMERIC: Final = {"error": "please provide numeric product ID"}
NOT_JSON: Final = {"error": "please provide valid ratings JSON"}
DEFAULT_RATINGS: Final = {"Reviewer1": 5, "Reviewer2": 4}
_LEADING_INT: Final = re.compile(r"\s*([+-]?\d+)")


def parse_int(text: str) -> int | None:
    """JavaScript's parseInt(text) in base 10: the leading integer, trailing junk ignored; None for NaN."""
    match = _LEADING_INT.match(text)
    return int(match.group(1)) if match else None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # JSON.parse has no NaN/Infinity


def make_app(config: AppConfig) -> web.Application:
    posted: dict[int, dict[str, Any]] = {}  # userAddedRatings: this instance's memory only

    def product_id_of(request: web.Request) -> int | None:
        # The original splits the raw URL, query string included, and parses its last segment.
        return parse_int(request.raw_path.rsplit("/", 1)[-1])

    async def health(request: web.Request) -> web.Response:
        return json_response({"status": "Ratings is healthy"})

    async def get_ratings(request: web.Request) -> web.Response:
        product_id = product_id_of(request)
        if product_id is None:
            return json_response(NOT_NUMERIC, 400)
        return json_response(posted.get(product_id) or {"id": product_id, "ratings": DEFAULT_RATINGS})

    async def post_ratings(request: web.Request) -> web.Response:
        product_id = product_id_of(request)
        if product_id is None:
            return json_response(NOT_NUMERIC, 400)
        try:
            ratings = json.loads(await request.text(), parse_constant=_reject_constant)
        except ValueError:
            return json_response(NOT_JSON, 400)
        posted[product_id] = {"id": product_id, "ratings": ratings}
        return json_response(posted[product_id])

    app = web.Application()
    app.router.add_get("/health", health)
    # httpdispatcher matches `^/ratings/[0-9]*` as a prefix: any path under /ratings/ reaches the handler.
    app.router.add_get("/ratings/{tail:.*}", get_ratings)
    app.router.add_post("/ratings/{tail:.*}", post_ratings)
    return app
