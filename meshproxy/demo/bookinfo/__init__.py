"""Istio's Bookinfo sample re-implemented on aiohttp, faithful in what a mesh can observe.

productpage → details, productpage → reviews → ratings; every app listens on 9080 in Kubernetes and
reaches the others by service name (`http://reviews:9080/...`). See
`shared/research/bookinfo-behaviour.md` for the behaviour reproduced here.
"""

from collections.abc import Callable

from aiohttp import web

from meshproxy.demo.bookinfo import details, productpage, ratings, reviews
from meshproxy.demo.bookinfo.common import AppConfig, Outbound

SERVICES: dict[str, Callable[[AppConfig], web.Application]] = {
    "productpage": productpage.make_app,
    "details": details.make_app,
    "reviews": reviews.make_app,
    "ratings": ratings.make_app,
}


def make_app(config: AppConfig) -> web.Application:
    """The application for `config.service` (one of SERVICES)."""
    try:
        factory = SERVICES[config.service]
    except KeyError:
        raise ValueError(f"unknown Bookinfo service {config.service!r}; one of {sorted(SERVICES)}") from None
    return factory(config)


__all__ = ["SERVICES", "AppConfig", "Outbound", "make_app"]
