"""Transparent listeners (Istio's 15001 outbound and 15006 inbound): connections redirected by iptables.

Once per connection, never per request: the original destination is read (`SO_ORIGINAL_DST`, IPv4 and IPv6) into
the connection's `ConnectionInfo`, the destination's port protocol is looked up in the compiled table
(`routing/l4.Destinations`), the first bytes are sniffed when the port does not declare it (`sniff.py`), and the
connection is handed to the codec `pick_codec` names: the HTTP/1.1 listener (the same `DownstreamProtocol` as an
explicit listener, given the bytes read so far) or the TCP proxy (`tcp.py`). Afterwards the connection costs what
it costs on any other listener.

- Outbound: HTTP is routed by Host as on the explicit listener, with one more virtual host for hosts outside the
  registry (`allow_any` to PassthroughCluster, the original destination; or `block_all`: 502 from
  BlackHoleCluster under REGISTRY_ONLY). TCP goes by `Destinations.route_tcp` / `route_tls` (SNI read from the
  ClientHello, TLS not terminated).
- Inbound: everything goes to the app at the original destination (the pod's address and port, as Istio since
  1.10: an app bound only to localhost is not exposed) from 127.0.0.6, reported as `reporter="destination"`.
- A listener with a fixed destination (`--tcp-listener LISTEN=ADDRESS:PORT`) is the same thing without iptables:
  its connections are handled as if they had been redirected on their way to ADDRESS:PORT.
- Inbound authorization: HTTP requests pass the workload's policy in the HTTP listener (routing/inbound.enforcing);
  a connection handed to the TCP proxy is decided once by the policy compiled for TCP (`WorkloadPolicy.tcp`, from
  the snapshot the connection was accepted under), with its original destination as destination ip and port and,
  on mutual TLS, the client's principal; a denied one is closed (`TcpProxy.deny`). A gateway's --tcp-listener is
  authorized the same way, with the listener's own address as destination.
- Mutual TLS (proxy/transparent_tls.py) terminates before this protocol is made: it reads the decrypted bytes,
  and the peer's principal and SNI from the TLS transport.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, cast

from ..routing import protocol as proto
from ..routing.cluster import Cluster
from ..routing.l4 import Destinations, L4Decision, L4Target
from ..routing.table import RouteTable
from ..security.peer import peer_principal, requested_server_name
from ..security.policy import check_connection
from ..stream_info import ConnectionInfo, L4Info
from . import sniff
from .downstream import ListenerContext
from .listener import DownstreamProtocol
from .tcp import TcpContext, TcpProxy

if TYPE_CHECKING:
    from ..security.authz import Authorizer

log = logging.getLogger("meshproxy.transparent")

SO_ORIGINAL_DST: Final = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST (linux/netfilter_ipv6/ip6_tables.h) too
SOL_IPV6: Final = 41

CODEC_HTTP1: Final = 1
CODEC_TCP: Final = 2


def pick_codec(kind: int) -> int:
    """The codec of a connection whose first bytes are `kind` (sniff.HTTP1, HTTP2, TLS, TCP). HTTP/2 with prior
    knowledge goes to the HTTP listener too, which hands a connection that opens with the preface to the HTTP/2
    codec (proxy/h2_listener.py): h2c and gRPC are routed as HTTP."""
    if kind == sniff.HTTP1 or kind == sniff.HTTP2:
        return CODEC_HTTP1
    return CODEC_TCP


def original_destination(sock: socket.socket | None) -> tuple[str, int] | None:
    """The destination the client dialled before iptables REDIRECT changed it; None when there is none."""
    if sock is None:
        return None
    try:
        if sock.family == socket.AF_INET:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)  # struct sockaddr_in
            return socket.inet_ntop(socket.AF_INET, raw[4:8]), int.from_bytes(raw[2:4], "big")
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(SOL_IPV6, SO_ORIGINAL_DST, 28)  # struct sockaddr_in6
            return socket.inet_ntop(socket.AF_INET6, raw[8:24]), int.from_bytes(raw[2:4], "big")
    except OSError:
        return None  # not redirected (no conntrack entry)
    return None


@dataclass(slots=True)
class Interception:
    """What every connection of one transparent listener shares (the app builds it; see app.py)."""

    name: str
    direction: str  # "outbound" | "inbound"
    table: Callable[[], RouteTable]  # the current config (its `destinations`), read once per connection
    http: Callable[[tuple[str, int]], ListenerContext]  # the HTTP/1.1 listener context for a destination
    tcp: TcpContext
    # inbound|PORT|| (a declared port) or InboundPassthroughClusterIpv4/6: the app at the original destination
    inbound_cluster: Callable[[tuple[str, int], bool], Cluster]
    detection_timeout: float = 0.0  # meshConfig.protocolDetectionTimeout; 0 waits for the client's bytes
    fixed_destination: tuple[str, int] | None = None  # a --tcp-listener: no SO_ORIGINAL_DST
    # Its TCP connections pass the workload's authorization: the transparent inbound listener (destination: the
    # original one), and a gateway's --tcp-listener (its clients' traffic; destination: the listener's address).
    authorizes: bool = False


class Intercepted:
    """An accepted connection until its codec is chosen (an asyncio protocol; then the codec's protocol takes the
    transport over)."""

    __slots__ = ("listener", "transport", "info", "buffer", "protocol", "timer", "destinations", "target",
                 "destination", "handed_over", "known", "tcp_authz")

    def __init__(self, listener: Interception, known: tuple[str, int] | None = None) -> None:
        """`known`: the original destination, when the acceptor read it already (the TLS listener does)."""
        self.listener = listener
        self.known = known
        self.tcp_authz: Authorizer | None = None  # the workload's TCP authorization (inbound), of this snapshot
        self.transport: asyncio.Transport | None = None
        self.info = ConnectionInfo()
        self.buffer = b""
        self.protocol = proto.UNSUPPORTED
        self.timer: asyncio.TimerHandle | None = None
        self.destinations: Destinations | None = None
        self.target: L4Target | None = None
        self.destination: tuple[str, int] = ("", 0)
        self.handed_over = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = stream = cast(asyncio.Transport, transport)
        listener = self.listener
        destination = self.known or listener.fixed_destination or \
            original_destination(transport.get_extra_info("socket"))
        local = transport.get_extra_info("sockname")
        if destination is None or (local is not None and (local[0], local[1]) == destination):
            log.debug("%s: connection without an original destination (not redirected): closed", listener.name)
            stream.close()
            return
        self.destination = destination
        peer = transport.get_extra_info("peername")
        self.info = ConnectionInfo(str(peer[0]).encode() if peer else b"unknown", transport)
        self.info.original_destination = destination
        tcp_over_mtls = False
        if self.known is not None:  # from the TLS acceptor: on mutual TLS, the client's identity, once
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None:
                self.info.peer_principal = peer_principal(ssl_object)
                self.info.requested_server_name = requested_server_name(ssl_object)
                # no HTTP protocol offered (an Istio sidecar's `istio-peer-exchange`, `istio` for TCP): Istio's
                # mTLS TCP filter chain, whatever the bytes look like
                tcp_over_mtls = ssl_object.selected_alpn_protocol() is None
        table = listener.table()
        destinations = self.destinations = table.destinations
        address, port = destination
        if listener.authorizes:
            self.tcp_authz = table.security.tcp
        if destinations is not None:
            if listener.direction == "inbound":
                self.protocol = destinations.inbound_protocol(address, port)
            else:
                self.target = destinations.find(address, port)
                self.protocol = self.target.protocol if self.target is not None else proto.UNSUPPORTED
        protocol = self.protocol
        if protocol == proto.HTTP or protocol == proto.HTTP_PROXY:
            self._hand_over(CODEC_HTTP1)
        elif proto.is_tcp(protocol) and not (proto.is_tls(protocol) and listener.direction == "outbound"):
            self._hand_over(CODEC_TCP)  # server-first protocols work: nothing is waited for
        elif tcp_over_mtls:
            self._hand_over(CODEC_TCP)
        elif listener.detection_timeout > 0:
            self.timer = asyncio.get_running_loop().call_later(listener.detection_timeout, self._detection_timeout)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        buffer = self.buffer
        kind = sniff.classify(buffer)
        if kind == sniff.NEED_MORE:
            return
        if kind == sniff.TLS and self.listener.direction == "outbound" and not sniff.client_hello_complete(buffer):
            return  # the server name is in the ClientHello: wait for all of it
        sni = sniff.server_name(buffer) if kind == sniff.TLS else ""
        if proto.is_tls(self.protocol):  # a declared TLS port stays TCP whatever it carries: only its SNI was awaited
            self._hand_over(CODEC_TCP, sni)
        else:
            self._hand_over(pick_codec(kind), sni)

    def eof_received(self) -> bool | None:
        """The client half-closed before its bytes decided: TCP, with the EOF passed on."""
        self._hand_over(CODEC_TCP)
        if self.handed_over and self.transport is not None:
            protocol = self.transport.get_protocol()
            if protocol is not self:
                return cast(asyncio.Protocol, protocol).eof_received()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _detection_timeout(self) -> None:
        self.timer = None
        if not self.handed_over and self.transport is not None and not self.transport.is_closing():
            self._hand_over(CODEC_TCP)

    # ---- hand-over

    def _hand_over(self, codec: int, sni: str = "") -> None:
        if self.handed_over or self.transport is None:
            return
        self.handed_over = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        transport = self.transport
        buffered, self.buffer = self.buffer, b""
        if codec == CODEC_HTTP1:
            downstream = DownstreamProtocol(self.listener.http(self.destination))
            transport.set_protocol(cast(asyncio.BaseProtocol, downstream))
            downstream.connection_made(transport)
            downstream.info.original_destination = self.destination
            if buffered and not downstream.closed:
                downstream.data_received(buffered)
            return
        decision, host, port = self._route_tcp(sni)
        info = L4Info(self.info, time.monotonic())  # the same clock as StreamInfo's (telemetry subtracts)
        info.sni = sni
        info.rule = decision.rule
        tcp = self.listener.tcp
        proxy = TcpProxy(tcp, info, tcp.telemetry.service(host, port))
        authz = self.tcp_authz
        if authz is not None:  # Envoy's network RBAC filter, once per connection
            if self.listener.direction == "inbound":
                address, dport = self.destination
            else:  # a gateway's own listener
                local = transport.get_extra_info("sockname")
                address, dport = str(local[0]), int(local[1])
            verdict = check_connection(authz, dport, self.info.peer_ip.decode(), self.info.peer_principal, address,
                                       self.info.requested_server_name or sni)
            if not verdict.allowed:
                proxy.deny(transport, buffered, decision.cluster, verdict.policy_id)
                return
        proxy.take(transport, buffered, decision.cluster)

    def _route_tcp(self, sni: str) -> tuple[L4Decision, str, int]:
        """The TCP route of this connection, and the destination service its metrics name."""
        listener = self.listener
        address, port = self.destination
        randbelow = listener.tcp.rng.randrange
        if listener.direction == "inbound":
            found = self.destinations.endpoints.get((address, port)) if self.destinations is not None else None
            inbound = listener.inbound_cluster(self.destination, found is not None)
            return L4Decision(inbound), found.service if found else "", found.port if found else port
        destinations = self.destinations
        if destinations is None:
            return L4Decision(None), "", port
        if sni:  # a TLS ClientHello with a server name: routed by it, passed through undecrypted
            decision = destinations.route_tls(self.target, address, port, sni, randbelow)
        else:
            decision = destinations.route_tcp(self.target, address, port, randbelow)
        cluster = decision.cluster
        return decision, cluster.service if cluster is not None else "", cluster.port if cluster is not None else port
