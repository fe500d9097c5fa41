"""The request policy of one listener: JWT authentication, then authorization, compiled at load. Pure.

`compile_workload_policy` reads a snapshot's RequestAuthentications and AuthorizationPolicies for this proxy's
workload once per load; `WorkloadPolicy.bind(port, ...)` gives each listener that enforces it its own
`RequestPolicy` (the destination port is the listener's). A listener with nothing to enforce gets `NO_POLICY`,
and the data path's whole cost is `table.policy is not NO_POLICY`.

Where it applies (Istio's placement): on the traffic the workload receives, which is a sidecar's inbound listeners
(`--inbound`, destination port = the app's port, the port a Kubernetes pod would be addressed on) and a gateway's
own listener (`--gateway`: its clients' traffic; destination port = the listen port). A sidecar's outbound
listener (the app's own calls) is never authorized by its own proxy: the destination's proxy does it.

Plain TCP connections the workload receives (the transparent inbound listener; a gateway's --tcp-listener) are
decided once, when the connection is handed to the TCP proxy, by `WorkloadPolicy.tcp` (AuthorizationPolicy
compiled for TCP, as Envoy's network RBAC filter in an Istio sidecar): `check_connection`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from ..messages import RequestHead
from .peer_authn import DEFAULT_PEER_AUTHN, PeerAuthnPolicy

if TYPE_CHECKING:  # the machinery is loaded with the first policy: a proxy without one never carries it (1.5 MiB)
    from ..istio import model as m
    from .authz import Authorizer, Decision
    from .jwt_authn import AuthnResult, Failure, JwksCache, JwtAuthenticator, RemoteJwks
    from .scope import Workload

log = logging.getLogger("meshproxy.authz")

FORWARDED_FOR: Final = b"x-forwarded-for"


@dataclass(frozen=True, slots=True)
class WorkloadPolicy:
    """What the snapshot says about requests to this workload (before a listener binds its port)."""

    authn: JwtAuthenticator | None = None
    authz: Authorizer | None = None  # None: no AuthorizationPolicy applies
    # PeerAuthentication, resolved: the TLS transport asks `peer.mode_for_port(port)` for each inbound connection.
    peer: PeerAuthnPolicy = DEFAULT_PEER_AUTHN
    tcp: Authorizer | None = None  # AuthorizationPolicy for plain TCP connections (None: none applies)

    @property
    def empty(self) -> bool:
        """Nothing to check per request (mTLS modes are the transport's, per connection)."""
        return self.authn is None and self.authz is None

    def bind(self, port: int, remote_from_xff: bool) -> RequestPolicy:
        if self.empty:
            return NO_POLICY
        return RequestPolicy(self.authn, self.authz, port, remote_from_xff)


NO_WORKLOAD_POLICY: Final = WorkloadPolicy()


def compile_workload_policy(snapshot: m.Snapshot, workload: Workload, cache: JwksCache) -> WorkloadPolicy:
    if not (snapshot.request_authentications or snapshot.authorization_policies or snapshot.peer_authentications):
        return NO_WORKLOAD_POLICY
    from .authz import NO_AUTHZ, compile_authz
    from .jwt_authn import compile_jwt_authn
    from .peer_authn import resolve_peer_authn

    authn = compile_jwt_authn(snapshot.request_authentications, workload, cache)
    authz = compile_authz(snapshot.authorization_policies, workload)
    tcp = compile_authz(snapshot.authorization_policies, workload, for_tcp=True)
    peer = resolve_peer_authn(snapshot.peer_authentications, workload) if snapshot.peer_authentications \
        else DEFAULT_PEER_AUTHN
    if authn is None and authz is NO_AUTHZ and peer is DEFAULT_PEER_AUTHN:
        return NO_WORKLOAD_POLICY
    return WorkloadPolicy(authn, None if authz is NO_AUTHZ else authz, peer, None if tcp is NO_AUTHZ else tcp)


@dataclass(slots=True)
class Verdict:
    """The request is answered here: by JWT authentication (401/403) or by authorization (403)."""

    status: int
    failure: Failure | None = None  # authentication's
    decision: Decision | None = None  # authorization's
    waiting_for: RemoteJwks | None = None  # no answer yet: the keys are being fetched


@dataclass(frozen=True, slots=True)
class RequestPolicy:
    authn: JwtAuthenticator | None
    authz: Authorizer | None  # None: no AuthorizationPolicy applies
    port: int  # destination.port and `ports` of the requests this listener receives
    remote_from_xff: bool  # remote.ip is the last X-Forwarded-For address (sidecar inbound, as Envoy there)

    def check(self, head: RequestHead, peer_ip: bytes, peer_principal: str = "", local_ip: str = "",
              sni: str = "") -> Verdict | None:
        """None: go on (the head's headers may have been changed as authentication says); else the answer."""
        claims = None
        authn = self.authn
        if authn is not None and not _cors_preflight(head):  # Istio: bypass_cors_preflight (no credentials sent)
            result = authn.authenticate(head.headers, head.query)
            if result.waiting_for is not None:
                return Verdict(0, waiting_for=result.waiting_for)
            if result.failure is not None:
                return Verdict(result.failure.status, failure=result.failure)
            claims = result.claims
            if claims is not None:
                apply_authn(head, result)
        authz = self.authz
        if authz is None:
            return None
        from .authz import AuthzRequest  # loaded with the policies, already

        source = peer_ip.decode("latin-1")
        remote = _last_forwarded(head.headers) if self.remote_from_xff else ""
        req = AuthzRequest(head.method.decode("latin-1"), head.path.decode("latin-1"),
                           head.authority.decode("latin-1"), head.headers, peer_principal, source, remote or source,
                           local_ip, self.port, sni, claims)
        if authz.audit:  # AUDIT marks the request in the log, it never decides
            mark = authz.audited(req)
            if mark:
                log.info("audit: %s %s matched %s", head.method.decode("latin-1"), req.path, mark)
        dry_run = authz.dry_run
        if dry_run is not None:  # istio.io/dry-run policies: what they would decide, logged only
            shadow = dry_run.check(req)
            log.info("dry-run: %s %s would be %s", head.method.decode("latin-1"), req.path,
                     "allowed" if shadow.allowed else f"denied by {shadow.policy_id}")
        decision = authz.check(req)
        if decision.allowed:
            return None
        return Verdict(403, decision=decision)

NO_POLICY: Final = RequestPolicy(None, None, 0, False)


def check_connection(authz: Authorizer, port: int, peer_ip: str, principal: str = "", local_ip: str = "",
                     sni: str = "") -> Decision:
    """A plain TCP connection to `port` (its original destination port), decided once: Envoy's network RBAC filter.
    `principal` is the client's, from its certificate on mutual TLS ("" on plaintext); remote.ip is the peer (no
    X-Forwarded-For on TCP)."""
    from .authz import AuthzRequest

    req = AuthzRequest("", "", "", (), principal, peer_ip, peer_ip, local_ip, port, sni, None)
    if authz.audit:
        mark = authz.audited(req)
        if mark:
            log.info("audit: TCP connection from %s to port %d matched %s", peer_ip, port, mark)
    if authz.dry_run is not None:
        shadow = authz.dry_run.check(req)
        log.info("dry-run: TCP connection from %s to port %d would be %s", peer_ip, port,
                 "allowed" if shadow.allowed else f"denied by {shadow.policy_id}")
    return authz.check(req)


def apply_authn(head: RequestHead, result: AuthnResult) -> None:
    """Upstream changes of a verified token: its header removed (unless forwarded), the output headers set."""
    if result.remove:
        head.headers = [(k, v) for k, v in head.headers if k not in result.remove]
    if result.add:
        head.headers = head.headers + result.add


def _last_forwarded(headers: Sequence[tuple[bytes, bytes]]) -> str:
    value: Any = None
    for name, item in headers:
        if name == FORWARDED_FOR:
            value = item
    if not value:
        return ""
    return value.rsplit(b",", 1)[-1].strip().decode("latin-1")


def _cors_preflight(head: RequestHead) -> bool:
    return head.method == b"OPTIONS" and head.header(b"origin") is not None \
        and head.header(b"access-control-request-method") is not None
