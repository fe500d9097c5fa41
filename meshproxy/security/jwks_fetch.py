"""Fetching the keys of every `jwksUri` off the data path, and refreshing them (asyncio; urllib in a thread).

As istiod does for Envoy: a URI (a jwksUri, or with neither jwks nor jwksUri the issuer's OpenID configuration,
`<issuer>/.well-known/openid-configuration`, whose `jwks_uri` is then fetched) is fetched when a loaded RequestAuthentication first names it, then again every
`refresh_interval` (istiod's default 20 minutes); a failed fetch is retried with a back-off from 1 s to 60 s and
keeps the last good keys. Until a URI's first fetch ends, a request with a token waits for it (the exchange
awaits `RemoteJwks.pending`); a URI that never answered fails tokens with `Jwks remote fetch is failed`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.request
from typing import Final
from urllib.parse import urlsplit

from .jwt_authn import JwksCache, RemoteJwks, parse_jwks

log = logging.getLogger("meshproxy.jwks")

MAX_JWKS_BYTES: Final = 1 << 20
FIRST_RETRY: Final = 1.0
MAX_RETRY: Final = 60.0
DEFAULT_REFRESH: Final = 20 * 60.0


def _get(uri: str, timeout: float) -> bytes:
    request = urllib.request.Request(uri, headers={"accept": "application/json", "user-agent": "meshproxy"})
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310  # http(s) only (loader)
        body: bytes = response.read(MAX_JWKS_BYTES + 1)
    if len(body) > MAX_JWKS_BYTES:
        raise ValueError(f"JWKS larger than {MAX_JWKS_BYTES} bytes")
    return body


class JwksFetcher:
    """Keeps every RemoteJwks of `cache` fetched; `watch` runs for the life of the process."""

    def __init__(self, cache: JwksCache, refresh_interval: float = DEFAULT_REFRESH) -> None:
        self.cache = cache
        self.refresh_interval = refresh_interval
        self.retry: dict[str, float] = {}  # uri -> current back-off after failures
        self.due: dict[str, float] = {}  # uri -> monotonic time of its next fetch
        self.tasks: set[asyncio.Task[None]] = set()
        self.wake = asyncio.Event()

    def start_new(self) -> None:
        """Fetch, now, the URIs never fetched (call after each load)."""
        for remote in list(self.cache.remotes.values()):
            if remote.fetched_at is None and remote.pending is None:
                self._start(remote)

    def _start(self, remote: RemoteJwks) -> None:
        loop = asyncio.get_running_loop()
        remote.pending = loop.create_future()
        task = loop.create_task(self._fetch(remote))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _fetch(self, remote: RemoteJwks) -> None:
        loop = asyncio.get_running_loop()
        try:
            uri: object = remote.uri
            if remote.discover:  # OpenID Connect discovery: the issuer's configuration names its jwks_uri
                configuration = json.loads(await loop.run_in_executor(None, _get, remote.uri, remote.timeout))
                uri = configuration.get("jwks_uri") if isinstance(configuration, dict) else None
            if not isinstance(uri, str) or urlsplit(uri).scheme not in ("http", "https"):
                raise ValueError(f"no http(s) jwks_uri in {remote.uri}")
            body = await loop.run_in_executor(None, _get, uri, remote.timeout)
            keys = parse_jwks(body)
        except Exception as exc:  # noqa: BLE001  # any failure of a remote document: keep the last good keys
            remote.error = f"{type(exc).__name__}: {exc}"
            backoff = self.retry[remote.uri] = min(MAX_RETRY, self.retry.get(remote.uri, FIRST_RETRY / 2) * 2)
            self.due[remote.uri] = time.monotonic() + backoff
            log.warning("jwksUri %s: fetch failed (%s); %s, retry in %.0fs", remote.uri, remote.error,
                        "keeping the last keys" if remote.keys is not None else "tokens of its issuer fail", backoff)
        else:
            remote.keys, remote.error = keys, ""
            self.retry.pop(remote.uri, None)
            self.due[remote.uri] = time.monotonic() + self.refresh_interval
            log.info("jwksUri %s: %d keys", remote.uri, len(keys.keys))
        finally:
            remote.fetched_at = time.monotonic()
            pending, remote.pending = remote.pending, None
            if pending is not None and not pending.done():
                pending.set_result(None)
            self.wake.set()

    async def watch(self) -> None:
        """Refresh each URI when due (a refresh interval after a success, its back-off after a failure)."""
        while True:
            now = time.monotonic()
            for remote in list(self.cache.remotes.values()):
                due = self.due.get(remote.uri)
                if remote.pending is None and (remote.fetched_at is None or (due is not None and due <= now)):
                    self._start(remote)
            for uri in [u for u in self.due if u not in self.cache.remotes]:  # no longer named by the config
                del self.due[uri]
            nearest = min((d for d in self.due.values()), default=now + self.refresh_interval)
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), max(0.05, nearest - time.monotonic()))
            except TimeoutError:
                pass
