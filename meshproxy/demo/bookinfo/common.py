"""What the four Bookinfo apps share: their configuration, the headers they forward, the outbound GET."""

import json
import secrets
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from multidict import CIMultiDictProxy

SERVICE_PORT: Final = 9080

# Copied verbatim by productpage (`getForwardHeaders`). B3 is re-encoded separately (see productpage.b3_headers)
# and `end-user` comes from the session, never from the incoming request.
PRODUCTPAGE_FORWARDED_HEADERS: Final = (
    "x-request-id",
    "x-ot-span-context",
    "x-datadog-trace-id",
    "x-datadog-parent-id",
    "x-datadog-sampling-priority",
    "traceparent",
    "tracestate",
    "x-cloud-trace-context",
    "grpc-trace-bin",
    "sw8",
    "user-agent",
    "cookie",
    "authorization",
    "jwt",
)

# Copied verbatim by reviews (to ratings) and details v2 (to the books API): all five B3 headers and end-user,
# which is how an `end-user: jason` match still works on the reviews → ratings hop.
PROPAGATED_HEADERS: Final = (
    "x-request-id",
    "x-ot-span-context",
    "x-datadog-trace-id",
    "x-datadog-parent-id",
    "x-datadog-sampling-priority",
    "traceparent",
    "tracestate",
    "x-cloud-trace-context",
    "grpc-trace-bin",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "sw8",
    "end-user",
    "user-agent",
    "cookie",
    "authorization",
    "jwt",
)


@dataclass(frozen=True, slots=True)
class Outbound:
    """How an app reaches `http://<service>:9080`: through its sidecar as an HTTP proxy, or (tests without a
    mesh) straight to a mapped `host:port` per service name. The URL and `Host` header stay the originals'."""

    proxy: str | None = None
    addresses: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.proxy and self.addresses:
            raise ValueError("Outbound takes a proxy or an address map, not both")


@dataclass(frozen=True, slots=True)
class AppConfig:
    service: str
    version: str = "v1"
    pod_name: str = field(default_factory=socket.gethostname)  # the originals show $HOSTNAME
    outbound: Outbound = field(default_factory=Outbound)
    # Seconds per outbound attempt (connect, then each read). None means the original's value:
    # productpage 3.0 (2 attempts for reviews), reviews v2 10.0 and v3 2.5 for its ratings call.
    timeout: float | None = None
    cluster_name: str | None = None  # reviews reports $CLUSTER_NAME; unset prints as "null" like Java
    session_secret: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)


def service_url(service: str, path: str) -> str:
    return f"http://{service}:{SERVICE_PORT}{path}"


def copy_headers(incoming: CIMultiDictProxy[str], names: Iterable[str]) -> dict[str, str]:
    """The named headers that are present, first value each (what Flask's and JAX-RS's `get` return)."""
    copied: dict[str, str] = {}
    for name in names:
        value = incoming.get(name)
        if value is not None:
            copied[name] = value
    return copied


def json_response(body: Any, status: int = 200, *, compact: bool = True) -> web.Response:
    """`Content-Type: application/json` without a charset, as the originals send it. Ruby's to_json and
    JavaScript's JSON.stringify are compact and write UTF-8; Python's json.dumps (productpage) puts spaces
    after , and : and escapes non-ASCII."""
    separators = (",", ":") if compact else (", ", ": ")
    text = json.dumps(body, separators=separators, ensure_ascii=not compact)
    return web.Response(body=text.encode(), status=status, content_type="application/json")


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes


class _MappedResolver(AbstractResolver):
    """Resolves service names to fixed `host:port` pairs, so a test reaches `details:9080` on a loopback port."""

    def __init__(self, addresses: Mapping[str, str]) -> None:
        self._table: dict[str, tuple[str, int]] = {}
        for name, address in addresses.items():
            host, _, port = address.rpartition(":")
            self._table[name] = (host, int(port))

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[ResolveResult]:
        try:
            mapped_host, mapped_port = self._table[host]
        except KeyError:
            raise OSError(f"no address mapped for {host!r}") from None
        return [
            ResolveResult(
                hostname=host,
                host=mapped_host,
                port=mapped_port,
                family=socket.AF_INET6 if ":" in mapped_host else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
        ]

    async def close(self) -> None:
        pass


class HttpClient:
    """Outbound GETs to the other Bookinfo services."""

    __slots__ = ("_proxy", "_session")

    def __init__(self, outbound: Outbound) -> None:
        resolver = _MappedResolver(outbound.addresses) if outbound.addresses else None
        # force_close: the originals open a fresh connection per call (productpage: "intentionally do not
        # pool"), so every call is a new connection through the sidecar. limit=0: requests has no cap either.
        connector = aiohttp.TCPConnector(force_close=True, limit=0, resolver=resolver)
        self._session = aiohttp.ClientSession(connector=connector)
        self._proxy = outbound.proxy

    async def get(self, url: str, headers: Mapping[str, str], timeout: float) -> Reply | None:
        """The reply, or None when the call failed (connect error, reset, timeout).

        `timeout` bounds the connect and then each read, not the whole exchange: that is what both
        python-requests' `timeout=` and the JAX-RS connection/receive timeouts do."""
        limits = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=timeout, sock_read=timeout)
        try:
            async with self._session.get(url, headers=headers, proxy=self._proxy, timeout=limits) as response:
                return Reply(response.status, await response.read())
        except (aiohttp.ClientError, OSError):  # OSError covers TimeoutError
            return None

    async def close(self) -> None:
        await self._session.close()


CLIENT: Final = web.AppKey("bookinfo_client", HttpClient)


def add_client(app: web.Application, outbound: Outbound) -> None:
    """Give `app` an HttpClient at app[CLIENT], opened at startup and closed at cleanup."""

    async def client_lifetime(app: web.Application) -> Any:
        client = HttpClient(outbound)
        app[CLIENT] = client
        yield
        await client.close()

    app.cleanup_ctx.append(client_lifetime)
