"""Istio's MeshConfig (`--mesh-config FILE`): the mesh-wide settings a sidecar acts on.

The file is what Istio reads: the MeshConfig YAML itself (the `mesh` key of the `istio` ConfigMap), the ConfigMap
(`kind: ConfigMap`, `data.mesh`), or an IstioOperator / Helm values file (`spec.meshConfig` or `meshConfig`).
Fields meshproxy acts on (Istio's defaults in brackets):

- `outboundTrafficPolicy.mode`: ALLOW_ANY | REGISTRY_ONLY [ALLOW_ANY]: where a transparent connection to a
  destination outside the registry goes (PassthroughCluster, or BlackHoleCluster: 502 for HTTP, closed for TCP);
- `protocolDetectionTimeout` [0s: no timeout]: how long an undeclared port waits for the client's first bytes
  before it is proxied as TCP (server-first protocols need it, or a declared port);
- `connectTimeout` [10s]: upstream connect timeout when a DestinationRule sets none;
- `accessLogFile` [""] and `accessLogEncoding` (TEXT | JSON) [TEXT]: the access log, on when the file is set;
- `defaultConfig.terminationDrainDuration` [5s]: the drain time after SIGTERM.

Other MeshConfig fields are valid (Istio accepts them) and logged as not acted on; an unknown field, a wrong type or
an unknown enum value is an error naming the file and the field, as Istio's mesh validation rejects it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .problems import ConfigError, Problem
from .values import is_duration, parse_duration

log = logging.getLogger("meshproxy.mesh")

OUTBOUND_MODES = {"REGISTRY_ONLY": "REGISTRY_ONLY", "ALLOW_ANY": "ALLOW_ANY", 0: "REGISTRY_ONLY", 1: "ALLOW_ANY"}
ACCESS_LOG_ENCODINGS = {"TEXT": "text", "JSON": "json", 0: "text", 1: "json"}
# MeshConfig's other top-level fields (istio.io/api mesh/v1alpha1/config.proto): accepted, not acted on.
OTHER_FIELDS = frozenset({
    "proxyListenPort", "proxyInboundListenPort", "proxyHttpPort", "tcpKeepalive", "ingressClass", "ingressService",
    "ingressControllerMode", "ingressSelector", "enableTracing", "accessLogFormat", "enableEnvoyAccessLogService",
    "disableEnvoyListenerLog", "defaultConfig", "outboundClusterStatName", "inboundClusterStatName",
    "enableAutoMtls", "trustDomain", "trustDomainAliases", "caCertificates", "defaultServiceExportTo",
    "defaultVirtualServiceExportTo", "defaultDestinationRuleExportTo", "rootNamespace", "localityLbSetting",
    "dnsRefreshRate", "h2UpgradePolicy", "inboundTrafficPolicy", "certificates", "serviceSettings",
    "enablePrometheusMerge", "verifyCertificateAtClient", "ca", "extensionProviders", "defaultProviders",
    "discoverySelectors", "pathNormalization", "defaultHttpRetryPolicy", "meshMTLS", "tlsDefaults",
    "serviceScopeConfigs", "thriftConfig", "configSources", "mixerCheckServer", "mixerReportServer",
    "disablePolicyChecks", "policyCheckFailOpen", "sidecarToTelemetrySessionAffinity", "sdsUdsPath",
    "enableSdsTokenMount", "sdsRefreshDelay", "reportBatchMaxEntries", "reportBatchMaxTime", "authPolicy",
    "rdsRefreshDelay", "sidecarToTelemetrySessionAffinity", "meshId", "network",
})
ACTED_ON = frozenset({"outboundTrafficPolicy", "protocolDetectionTimeout", "connectTimeout", "accessLogFile",
                      "accessLogEncoding", "defaultConfig"})


@dataclass(frozen=True, slots=True)
class MeshConfig:
    """What the file sets; None where it is silent (the flag or Istio's default applies)."""

    outbound_traffic_policy: str | None = None
    protocol_detection_timeout: float | None = None
    connect_timeout: float | None = None
    access_log_file: str | None = None
    access_log_encoding: str | None = None
    termination_drain_duration: float | None = None


class _Reader:
    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[Problem] = []

    def error(self, path: str, message: str) -> None:
        self.problems.append(Problem(self.file, 0, path, message))

    def duration(self, spec: Mapping[str, Any], key: str, path: str) -> float | None:
        raw = spec.get(key)
        if raw is None:
            return None
        if not isinstance(raw, str) or not is_duration(raw):
            self.error(f"{path}{key}", f"{raw!r} is not a duration (e.g. 100ms, 5s)")
            return None
        return parse_duration(raw)

    def enum(self, spec: Mapping[str, Any], key: str, path: str, names: Mapping[Any, str]) -> str | None:
        raw = spec.get(key)
        if raw is None:
            return None
        value = names.get(raw)
        if value is None:
            known = ", ".join(str(n) for n in names if isinstance(n, str))
            self.error(f"{path}{key}", f"{raw!r} is not one of {known}")
        return value


def _mesh_document(doc: Any, reader: _Reader) -> tuple[Mapping[str, Any], str]:
    """The MeshConfig mapping inside the file, and its field path prefix."""
    if not isinstance(doc, Mapping):
        reader.error("", "expected a mapping (MeshConfig YAML)")
        return {}, ""
    if doc.get("kind") == "ConfigMap":
        text = (doc.get("data") or {}).get("mesh")
        if not isinstance(text, str):
            reader.error("data.mesh", "the ConfigMap has no `mesh` key (Istio's `istio` ConfigMap holds MeshConfig there)")
            return {}, ""
        try:
            inner = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            reader.error("data.mesh", f"not YAML: {exc}")
            return {}, ""
        return (inner, "data.mesh.") if isinstance(inner, Mapping) else ({}, "")
    if doc.get("kind") == "IstioOperator":
        return (doc.get("spec") or {}).get("meshConfig") or {}, "spec.meshConfig."
    if "meshConfig" in doc:
        return doc.get("meshConfig") or {}, "meshConfig."
    return doc, ""


def read_mesh_config(path: str) -> MeshConfig:
    """Read and check a mesh config file; raises ConfigError naming the file and field."""
    reader = _Reader(path)
    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError([Problem(path, 0, "", f"cannot read mesh config: {exc}")]) from None
    spec, prefix = _mesh_document(doc, reader)
    ignored = []
    for key in spec:
        if key not in ACTED_ON and key not in OTHER_FIELDS:
            reader.error(f"{prefix}{key}", f"unknown MeshConfig field {key!r}")
        elif key not in ACTED_ON:
            ignored.append(key)
    policy = spec.get("outboundTrafficPolicy")
    mode = None
    if policy is not None:
        if not isinstance(policy, Mapping):
            reader.error(f"{prefix}outboundTrafficPolicy", "expected a mapping with `mode`")
        else:
            mode = reader.enum(policy, "mode", f"{prefix}outboundTrafficPolicy.", OUTBOUND_MODES)
    detection = reader.duration(spec, "protocolDetectionTimeout", prefix)
    connect = reader.duration(spec, "connectTimeout", prefix)
    if connect is not None and connect <= 0:
        reader.error(f"{prefix}connectTimeout", "must be greater than 0")
    log_file = spec.get("accessLogFile")
    if log_file is not None and not isinstance(log_file, str):
        reader.error(f"{prefix}accessLogFile", "expected a string (a path, or /dev/stdout)")
        log_file = None
    log_file = log_file or None  # "" is Istio's default: no access log
    encoding = reader.enum(spec, "accessLogEncoding", prefix, ACCESS_LOG_ENCODINGS)
    proxy = spec.get("defaultConfig") or {}
    drain = None
    if isinstance(proxy, Mapping):
        drain = reader.duration(proxy, "terminationDrainDuration", f"{prefix}defaultConfig.")
        others = sorted(k for k in proxy if k != "terminationDrainDuration")
        if others:
            ignored.append("defaultConfig." + "/".join(others))
    if reader.problems:
        raise ConfigError(reader.problems)
    if ignored:
        log.warning("%s: MeshConfig fields not acted on by meshproxy: %s", path, ", ".join(ignored))
    return MeshConfig(outbound_traffic_policy=mode, protocol_detection_timeout=detection, connect_timeout=connect,
                      access_log_file=log_file, access_log_encoding=encoding, termination_drain_duration=drain)
