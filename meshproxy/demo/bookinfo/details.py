"""details: the book's details as JSON (Ruby WEBrick `details.rb` in Istio).

v2 of the original fetches the book from the Google Books API instead (ENABLE_EXTERNAL_BOOK_SERVICE). That is
out of scope here: every version answers like v1.
"""

import re
from typing import Any, Final

from aiohttp import web

from meshproxy.demo.bookinfo.common import AppConfig, json_response

NOT_NUMERIC: Final = {"error": "please provide numeric product id"}
_RUBY_OCTAL: Final = re.compile(r"[+-]?0[0-7_]+")


def book_details(product_id: int) -> dict[str, Any]:
    return {  # key order is part of the reply: it is the Ruby hash's order
        "id": product_id,
        "author": "William Shakespeare",
        "year": 1595,
        "type": "paperback",
        "pages": 200,
        "publisher": "PublisherA",
        "language": "English",
        "ISBN-10": "1234567890",
        "ISBN-13": "123-1234567890",
    }


def ruby_integer(text: str) -> int | None:
    """Ruby's Integer(text): surrounding spaces, 0x/0b/0o prefixes and `_` allowed, a leading 0 means octal."""
    text = text.strip()
    try:
        return int(text, 8) if _RUBY_OCTAL.fullmatch(text) else int(text, 0)
    except ValueError:
        return None


def make_app(config: AppConfig) -> web.Application:
    async def health(request: web.Request) -> web.Response:
        return json_response({"status": "Details is healthy"})

    async def details(request: web.Request) -> web.Response:
        # WEBrick mounts '/details' for the whole subtree; the id is the last non-empty path segment.
        product_id = ruby_integer(request.path.rstrip("/").rsplit("/", 1)[-1])
        if product_id is None:
            return json_response(NOT_NUMERIC, 400)
        return json_response(book_details(product_id))

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/details", details)
    app.router.add_get("/details/{tail:.*}", details)
    return app
