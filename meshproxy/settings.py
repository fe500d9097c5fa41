"""Settings: one frozen object, built by the CLI (flags or MESHPROXY_* environment variables)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


def parse_address(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """`host:port`, `:port` or `[v6]:port` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{text!r} is not host:port")
    host = host.strip("[]") or default_host
    number = int(port)
    if not 0 <= number <= 65535:
        raise ValueError(f"{text!r}: port out of range")
    return host, number


@dataclass(frozen=True, slots=True)
class InboundSpec:
    """`LISTEN=APP`: traffic arriving at LISTEN is for the local app at APP."""

    listen: tuple[str, int]
    app: tuple[str, int]

    @classmethod
    def parse(cls, text: str) -> InboundSpec:
        listen, sep, app = text.partition("=")
        if not sep:
            raise ValueError(f"{text!r} is not LISTEN=APP (e.g. 127.0.0.1:15006=127.0.0.1:9080)")
        return cls(parse_address(listen), parse_address(app))


@dataclass(frozen=True, slots=True)
class Settings:
    config: tuple[str, ...] = ()
    listen: tuple[str, int] | None = ("127.0.0.1", 15001)  # outbound; None disables it
    inbound: tuple[InboundSpec, ...] = ()
    admin: tuple[str, int] | None = ("127.0.0.1", 15000)
    admin_allow_remote: bool = False
    workload: str = "unknown"
    namespace: str = "default"
    labels: Mapping[str, str] = field(default_factory=dict)
    gateways: tuple[str, ...] = ("mesh",)
    log_level: str = "info"
    access_log: str = "off"  # off | text | json, to stdout
    drain_time: float = 5.0  # Istio terminationDrainDuration
    connect_timeout: float = 10.0  # Istio's mesh connectTimeout default
    upstream_idle_timeout: float = 4.0  # below common app keep-alives (Node 5 s), so the proxy closes first
    watch_interval: float = 1.0  # seconds between config file checks; 0 disables (SIGHUP still reloads)
    seed: int | None = None  # fixed seed for weights and faults (tests); None = random
