"""Telemetry of proxied TCP connections: Istio's TCP metrics and the access-log line of Envoy's TCP proxy.

`on_open` is called once the upstream connect has succeeded or failed, so the response flags that label the series
are final (`UF` for a failed connect, `NC`, `UO`, or none); it binds the series and counts the connection opened
(a counter never moves between series). The data path then adds bytes to `info.series` as they move, so a scrape sees them at once (Istio reports
deltas every few seconds and at close); `on_close` counts it closed and writes the access-log line.

Without mutual TLS there is no peer metadata exchange on plain TCP (Istio exchanges it over ALPN in mTLS), so the
peer's workload labels are `unknown`, as Istio reports them for a plaintext TCP peer. Outbound over mutual TLS, the
upstream's principal labels the series, and its workload too when it spoke Istio's TCP metadata exchange
(telemetry/peer_exchange.py; the connection is then counted opened once the upstream's header is in). An inbound
connection on mutual TLS reports `connection_security_policy="mutual_tls"` and the client's `source_principal` from
its certificate. A connection the workload's AuthorizationPolicy refused is counted opened and closed with no
response flag (Envoy's network RBAC filter sets none) and logged with `rbac_access_denied_matched_policy[...]` as its
termination details.
"""

from __future__ import annotations

import logging

from ..stream_info import L4Info, flags_text
from .access_log import AccessLog
from .core import SPIFFE, MeshTelemetry
from .metrics import (DESTINATION, MUTUAL_TLS, SOURCE, UNKNOWN_SERVICE, Service, TcpSeries,
                      tcp_label_values)
from .peer import UNKNOWN_WORKLOAD

log = logging.getLogger("meshproxy.telemetry")


class TcpTelemetry:
    """One listener's TCP telemetry; `direction` "outbound" reports as source, "inbound" as destination."""

    __slots__ = ("listener", "inbound", "access_log", "mesh")

    def __init__(self, listener: str, direction: str, access_log: AccessLog, mesh: MeshTelemetry | None) -> None:
        self.listener = listener
        self.inbound = direction == "inbound"
        self.access_log = access_log
        self.mesh = mesh

    def service(self, host: str, port: int) -> Service:
        """The destination service: the cluster's (PassthroughCluster and BlackHoleCluster by that name); inbound
        without a known service, this workload's canonical service, as Istio reports it."""
        mesh = self.mesh
        if mesh is None:
            return UNKNOWN_SERVICE
        if host:
            return mesh.service(host, port)
        own = mesh.own
        return mesh.services.setdefault(("", own.canonical_service),
                                        Service(own.canonical_service, own.canonical_service, own.namespace))

    def on_open(self, info: L4Info, service: Service) -> None:
        series = self._series(service, info.flags, info.connection.peer_principal, info.upstream_principal,
                              info.upstream_peer)
        if series is not None:
            series.opened += 1
            info.series = series

    def on_close(self, info: L4Info, service: Service) -> None:
        try:
            series: TcpSeries | None = info.series
            if series is not None:
                series.closed += 1
            if self.access_log.enabled:
                self.access_log.log_tcp(info, self.listener)
        except Exception:  # telemetry must never break the connection it observes
            log.exception("telemetry failed for a TCP connection (%s)", self.listener)

    def _series(self, service: Service, flags: int, principal: str = "", upstream_principal: str = "",
                upstream_peer: bytes = b"") -> TcpSeries | None:
        mesh = self.mesh
        if mesh is None or mesh.metrics is None:
            return None
        text = flags_text(flags)
        if self.inbound and principal:  # mutual TLS: the client's identity from its certificate, ours from --cert-dir
            labels = tcp_label_values(DESTINATION, UNKNOWN_WORKLOAD, mesh.own, service, text, MUTUAL_TLS,
                                      SPIFFE + principal, mesh.own_principal)
        elif self.inbound:
            labels = tcp_label_values(DESTINATION, UNKNOWN_WORKLOAD, mesh.own, service, text, "none")
        elif upstream_principal:  # mutual TLS upstream: both identities from the certificates, as for HTTP, and
            # its workload from Istio's TCP metadata exchange when it spoke it
            peer = mesh.peers.get(upstream_peer) if upstream_peer else UNKNOWN_WORKLOAD
            labels = tcp_label_values(SOURCE, mesh.own, peer, service, text, "unknown",
                                      source_principal=mesh.own_principal,
                                      destination_principal=SPIFFE + upstream_principal)
        else:
            labels = tcp_label_values(SOURCE, mesh.own, UNKNOWN_WORKLOAD, service, text, "unknown")
        return mesh.metrics.bind_tcp(labels)
