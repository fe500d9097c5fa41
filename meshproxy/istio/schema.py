"""Istio networking API (networking.istio.io v1, v1beta1, v1alpha3: one schema) as data.

Istio serves one schema under three API versions, generated from the protos in
istio/api (``networking/v1alpha3/{virtual_service,destination_rule,service_entry,
gateway,workload_entry,sidecar}.proto`` and ``type/v1beta1/selector.proto``).
This module writes that schema down as plain Python data, so the config loader
can reject an unknown field or a wrongly typed value with its field path, as
the Kubernetes structural CRD schema does (``spec.http[0].fault.delay.fixdDelay:
unknown field``), without any dependency on protobuf.

Field names are the proto JSON names (lowerCamelCase), which is what YAML uses.
Messages are named as in the proto; a nested message is written with a dot
(``HTTPFaultInjection.Delay``).  The fields cover Istio 1.31 (retry budget,
zone-aware load balancing, HTTP/2 keepalive, cookie attributes, ...), plus the
few fields that old Istio releases accepted and that real files still use
(listed in ``DEPRECATED``).

Types (``Type``) are either a scalar name or a tuple:

``"string"``, ``"bool"``
    as in YAML.  ``google.protobuf.BoolValue`` is ``"bool"``.
``"int32"``, ``"uint32"``, ``"int64"``
    integers in the type's range (``bool`` is not an integer).  The
    ``google.protobuf.UInt32Value`` wrapper is ``"uint32"``.  The two proto
    ``uint64`` fields (ring and Maglev table sizes) are ``"int64"``; proto JSON
    also accepts a 64-bit integer written as a decimal string.
``"double"``
    an int or a float (``google.protobuf.DoubleValue`` too).
``"duration"``
    ``google.protobuf.Duration`` in proto JSON: a string such as ``"1.5s"``;
    Istio also accepts ``ms``/``m``/``h`` units (``"10ms"``, ``"5m"``).
``"bytes"``
    a base64 string.
``"struct"``
    ``google.protobuf.Struct``: any mapping, not checked further.
``"value"``
    any YAML value (``google.protobuf.Value``, or server-set metadata).
``("enum", frozenset({...}))``
    an enum by value name.  Proto JSON also accepts the number; every enum
    here is numbered densely from 0, so ``0 <= n < len(names)`` is valid.
``("list", T)``
    a YAML sequence of T.
``("map", T)``
    a mapping from string keys to T.
``("portmap", T)``
    a mapping from port numbers (integer keys in YAML, digit strings in JSON) to T.
``"SomeMessage"``
    a key of ``MESSAGES``: a mapping whose keys must be fields of it.

``KINDS`` maps a ``kind`` to the message of its ``spec``.  ``ONEOFS`` lists, per
message, groups of fields of which at most one may be set.  ``DEPRECATED`` and
``DEPRECATED_ENUM_VALUES`` name what is accepted with a warning.  ``METADATA``
is the schema of Kubernetes ``metadata`` (``ObjectMeta``).
"""

from __future__ import annotations

from typing import Union

# A field type: a scalar name (str) or ("enum", frozenset) / ("list", T) /
# ("map", T) (tuple); a str that is a key of MESSAGES names a message.
Type = Union[str, tuple]

SCALARS: frozenset[str] = frozenset(
    {"string", "bool", "int32", "uint32", "int64", "double", "duration", "bytes", "struct", "value"}
)


def _enum(*names: str) -> tuple:
    return ("enum", frozenset(names))


_STRINGS: Type = ("list", "string")
_LABELS: Type = ("map", "string")

MESSAGES: dict[str, dict[str, Type]] = {
    # ---------------------------------------------------------------- VirtualService
    "VirtualService": {
        "hosts": _STRINGS,
        "gateways": _STRINGS,
        "http": ("list", "HTTPRoute"),
        "tls": ("list", "TLSRoute"),
        "tcp": ("list", "TCPRoute"),
        "exportTo": _STRINGS,
    },
    "Destination": {
        "host": "string",
        "subset": "string",
        "port": "PortSelector",
    },
    "PortSelector": {
        # Once a oneof {number, name}; `name` was removed from the API.
        "number": "uint32",
    },
    "HTTPRoute": {
        "name": "string",
        "match": ("list", "HTTPMatchRequest"),
        "route": ("list", "HTTPRouteDestination"),
        "redirect": "HTTPRedirect",
        "directResponse": "HTTPDirectResponse",
        "delegate": "Delegate",
        "rewrite": "HTTPRewrite",
        "timeout": "duration",
        "retries": "HTTPRetry",
        "fault": "HTTPFaultInjection",
        "mirror": "Destination",
        "mirrors": ("list", "HTTPMirrorPolicy"),
        # Deprecated integer percentage.  Istio's CRD lists it under both its
        # JSON name and its proto name (protojson accepts either).
        "mirrorPercent": "uint32",
        "mirror_percent": "uint32",
        "mirrorPercentage": "Percent",
        "corsPolicy": "CorsPolicy",
        "headers": "Headers",
    },
    "Delegate": {
        "name": "string",
        "namespace": "string",
    },
    "Headers": {
        "request": "Headers.HeaderOperations",
        "response": "Headers.HeaderOperations",
    },
    "Headers.HeaderOperations": {
        "set": ("map", "string"),
        "add": ("map", "string"),
        "remove": _STRINGS,
    },
    "TLSRoute": {
        "match": ("list", "TLSMatchAttributes"),
        "route": ("list", "RouteDestination"),
    },
    "TCPRoute": {
        "match": ("list", "L4MatchAttributes"),
        "route": ("list", "RouteDestination"),
    },
    "HTTPMatchRequest": {
        "name": "string",
        "uri": "StringMatch",
        "scheme": "StringMatch",
        "method": "StringMatch",
        "authority": "StringMatch",
        "headers": ("map", "StringMatch"),
        "port": "uint32",
        "sourceLabels": _LABELS,
        "gateways": _STRINGS,
        "queryParams": ("map", "StringMatch"),
        "ignoreUriCase": "bool",
        "withoutHeaders": ("map", "StringMatch"),
        "sourceNamespace": "string",
        "statPrefix": "string",
    },
    "HTTPRouteDestination": {
        "destination": "Destination",
        "weight": "int32",
        "headers": "Headers",
    },
    "RouteDestination": {
        "destination": "Destination",
        "weight": "int32",
    },
    "L4MatchAttributes": {
        "destinationSubnets": _STRINGS,
        "port": "uint32",
        "sourceSubnet": "string",
        "sourceLabels": _LABELS,
        "gateways": _STRINGS,
        "sourceNamespace": "string",
    },
    "TLSMatchAttributes": {
        "sniHosts": _STRINGS,
        "destinationSubnets": _STRINGS,
        "port": "uint32",
        "sourceLabels": _LABELS,
        "gateways": _STRINGS,
        "sourceNamespace": "string",
    },
    "HTTPRedirect": {
        "uri": "string",
        "prefixRewrite": "string",  # Istio 1.31: replace the matched uri prefix
        "authority": "string",
        "port": "uint32",
        "derivePort": _enum("FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT"),
        "scheme": "string",
        "redirectCode": "uint32",
    },
    "HTTPDirectResponse": {
        "status": "uint32",
        "body": "HTTPBody",
    },
    "HTTPBody": {
        "string": "string",
        "bytes": "bytes",
    },
    "HTTPRewrite": {
        "uri": "string",
        "authority": "string",
        "uriRegexRewrite": "RegexRewrite",
    },
    "RegexRewrite": {
        "match": "string",
        "rewrite": "string",
    },
    "StringMatch": {
        "exact": "string",
        "prefix": "string",
        "regex": "string",
    },
    "HTTPRetry": {
        "attempts": "int32",
        "perTryTimeout": "duration",
        "retryOn": "string",
        "retryRemoteLocalities": "bool",
        "retryIgnorePreviousHosts": "bool",
        "backoff": "duration",
    },
    "CorsPolicy": {
        "allowOrigin": _STRINGS,  # deprecated: exact origins only
        "allowOrigins": ("list", "StringMatch"),
        "allowMethods": _STRINGS,
        "allowHeaders": _STRINGS,
        "exposeHeaders": _STRINGS,
        "maxAge": "duration",
        "allowCredentials": "bool",
        "unmatchedPreflights": _enum("UNSPECIFIED", "FORWARD", "IGNORE"),
    },
    "HTTPFaultInjection": {
        "delay": "HTTPFaultInjection.Delay",
        "abort": "HTTPFaultInjection.Abort",
    },
    "HTTPFaultInjection.Delay": {
        "percent": "int32",  # deprecated integer 0-100
        "fixedDelay": "duration",
        "exponentialDelay": "duration",  # in the API, not implemented by Istio
        "percentage": "Percent",
    },
    "HTTPFaultInjection.Abort": {
        # `percent` is `reserved` in today's proto, so strict Istio rejects it;
        # Istio 1.0-era YAML (percent: 100) uses it.  Kept for those files.
        "percent": "int32",
        "httpStatus": "int32",
        "grpcStatus": "string",  # a gRPC status name, e.g. "UNAVAILABLE"
        "http2Error": "string",  # in the API, not implemented by Istio
        "percentage": "Percent",
    },
    "HTTPMirrorPolicy": {
        "destination": "Destination",
        "percentage": "Percent",
    },
    "Percent": {
        "value": "double",
    },
    # ---------------------------------------------------------------- DestinationRule
    "DestinationRule": {
        "host": "string",
        "trafficPolicy": "TrafficPolicy",
        "subsets": ("list", "Subset"),
        "exportTo": _STRINGS,
        # Not the ServiceEntry selector: this one is `matchLabels`.
        "workloadSelector": "istio.type.v1beta1.WorkloadSelector",
    },
    "TrafficPolicy": {
        "loadBalancer": "LoadBalancerSettings",
        "connectionPool": "ConnectionPoolSettings",
        "outlierDetection": "OutlierDetection",
        "tls": "ClientTLSSettings",
        "portLevelSettings": ("list", "TrafficPolicy.PortTrafficPolicy"),
        "tunnel": "TrafficPolicy.TunnelSettings",
        "proxyProtocol": "TrafficPolicy.ProxyProtocol",
        "retryBudget": "TrafficPolicy.RetryBudget",
    },
    "TrafficPolicy.PortTrafficPolicy": {
        "port": "PortSelector",
        "loadBalancer": "LoadBalancerSettings",
        "connectionPool": "ConnectionPoolSettings",
        "outlierDetection": "OutlierDetection",
        "tls": "ClientTLSSettings",
    },
    "TrafficPolicy.TunnelSettings": {
        "protocol": "string",  # CONNECT (default) or POST
        "targetHost": "string",
        "targetPort": "uint32",
    },
    "TrafficPolicy.ProxyProtocol": {
        "version": _enum("V1", "V2"),
    },
    "TrafficPolicy.RetryBudget": {
        "percent": "double",  # DoubleValue 0-100, not a Percent message
        "minRetryConcurrency": "uint32",
        "budgetInterval": "duration",
    },
    "Subset": {
        "name": "string",
        "labels": _LABELS,
        "trafficPolicy": "TrafficPolicy",
    },
    "LoadBalancerSettings": {
        "simple": _enum("UNSPECIFIED", "LEAST_CONN", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN", "LEAST_REQUEST"),
        "consistentHash": "LoadBalancerSettings.ConsistentHashLB",
        "localityLbSetting": "LocalityLoadBalancerSetting",
        "warmupDurationSecs": "duration",  # deprecated despite its name: a Duration
        "warmup": "WarmupConfiguration",
        "zoneAwareLbSetting": "ZoneAwareLoadBalancerSetting",
    },
    "LoadBalancerSettings.ConsistentHashLB": {
        "httpHeaderName": "string",
        "httpCookie": "LoadBalancerSettings.ConsistentHashLB.HTTPCookie",
        "useSourceIp": "bool",
        "httpQueryParameterName": "string",
        "ringHash": "LoadBalancerSettings.ConsistentHashLB.RingHash",
        "maglev": "LoadBalancerSettings.ConsistentHashLB.MagLev",
        "minimumRingSize": "int64",  # uint64, deprecated
    },
    "LoadBalancerSettings.ConsistentHashLB.RingHash": {
        "minimumRingSize": "int64",  # uint64
    },
    "LoadBalancerSettings.ConsistentHashLB.MagLev": {
        "tableSize": "int64",  # uint64; a prime below 5000011
    },
    "LoadBalancerSettings.ConsistentHashLB.HTTPCookie": {
        "name": "string",
        "path": "string",
        "ttl": "duration",
        "attributes": ("list", "LoadBalancerSettings.ConsistentHashLB.HTTPCookie.Attribute"),
    },
    "LoadBalancerSettings.ConsistentHashLB.HTTPCookie.Attribute": {
        "name": "string",
        "value": "string",
    },
    "WarmupConfiguration": {
        "duration": "duration",
        "minimumPercent": "double",
        "aggression": "double",
    },
    "LocalityLoadBalancerSetting": {
        "distribute": ("list", "LocalityLoadBalancerSetting.Distribute"),
        "failover": ("list", "LocalityLoadBalancerSetting.Failover"),
        "failoverPriority": _STRINGS,
        "enabled": "bool",
    },
    "LocalityLoadBalancerSetting.Distribute": {
        "from": "string",
        "to": ("map", "uint32"),
    },
    "LocalityLoadBalancerSetting.Failover": {
        "from": "string",
        "to": "string",
    },
    "ZoneAwareLoadBalancerSetting": {
        "enabled": "bool",
        "failover": ("list", "LocalityLoadBalancerSetting.Failover"),
        "failoverPriority": _STRINGS,
        "minClusterSize": "uint32",
    },
    "ConnectionPoolSettings": {
        "tcp": "ConnectionPoolSettings.TCPSettings",
        "http": "ConnectionPoolSettings.HTTPSettings",
    },
    "ConnectionPoolSettings.TCPSettings": {
        "maxConnections": "int32",
        "connectTimeout": "duration",
        "tcpKeepalive": "ConnectionPoolSettings.TCPSettings.TcpKeepalive",
        "maxConnectionDuration": "duration",
        "idleTimeout": "duration",
    },
    "ConnectionPoolSettings.TCPSettings.TcpKeepalive": {
        "probes": "uint32",
        "time": "duration",
        "interval": "duration",
    },
    "ConnectionPoolSettings.HTTPSettings": {
        "http1MaxPendingRequests": "int32",
        "http2MaxRequests": "int32",
        "maxRequestsPerConnection": "int32",
        "maxRetries": "int32",
        "idleTimeout": "duration",
        "h2UpgradePolicy": _enum("DEFAULT", "DO_NOT_UPGRADE", "UPGRADE"),
        "useClientProtocol": "bool",
        "maxConcurrentStreams": "int32",
        "http2KeepAlive": "ConnectionPoolSettings.HTTPSettings.ConnectionKeepalive",
    },
    "ConnectionPoolSettings.HTTPSettings.ConnectionKeepalive": {
        # HTTP/2 PING keepalive (Istio 1.31).
        "interval": "duration",
        "timeout": "duration",
    },
    "OutlierDetection": {
        "consecutiveErrors": "int32",  # deprecated
        "splitExternalLocalOriginErrors": "bool",
        "consecutiveLocalOriginFailures": "uint32",
        "consecutiveGatewayErrors": "uint32",
        "consecutive5xxErrors": "uint32",
        "interval": "duration",
        "baseEjectionTime": "duration",
        "maxEjectionPercent": "int32",
        "minHealthPercent": "int32",
        # Status codes 100-599 counted as errors instead of 5xx (Istio 1.31).
        "outlierDetectionHttpErrorCodes": ("list", "uint32"),
    },
    "ClientTLSSettings": {
        "mode": _enum("DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"),
        "clientCertificate": "string",
        "privateKey": "string",
        "caCertificates": "string",
        "credentialName": "string",
        "subjectAltNames": _STRINGS,
        "sni": "string",
        "insecureSkipVerify": "bool",
        "caCrl": "string",
    },
    "istio.type.v1beta1.WorkloadSelector": {
        "matchLabels": _LABELS,
    },
    # ---------------------------------------------------------------- ServiceEntry
    "ServiceEntry": {
        "hosts": _STRINGS,
        "addresses": _STRINGS,
        "ports": ("list", "ServicePort"),
        "location": _enum("MESH_EXTERNAL", "MESH_INTERNAL"),
        "resolution": _enum("NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN", "DYNAMIC_DNS"),
        "endpoints": ("list", "WorkloadEntry"),
        # networking.v1alpha3.WorkloadSelector: `labels`, not `matchLabels`.
        "workloadSelector": "WorkloadSelector",
        "exportTo": _STRINGS,
        "subjectAltNames": _STRINGS,
    },
    "ServicePort": {
        "number": "uint32",
        "protocol": "string",
        "name": "string",
        "targetPort": "uint32",
    },
    "WorkloadSelector": {
        "labels": _LABELS,
    },
    # ---------------------------------------------------------------- WorkloadEntry
    "WorkloadEntry": {
        "address": "string",
        "ports": ("map", "uint32"),
        "labels": _LABELS,
        "network": "string",
        "locality": "string",
        "weight": "uint32",
        "serviceAccount": "string",
    },
    # ---------------------------------------------------------------- Gateway
    "Gateway": {
        "servers": ("list", "Server"),
        "selector": _LABELS,
    },
    "Server": {
        "port": "Port",
        "bind": "string",
        "hosts": _STRINGS,
        "tls": "ServerTLSSettings",
        "defaultEndpoint": "string",
        "name": "string",
    },
    "Port": {
        "number": "uint32",
        "protocol": "string",
        "name": "string",
        "targetPort": "uint32",  # deprecated, hidden from docs
    },
    "ServerTLSSettings": {
        "httpsRedirect": "bool",
        "mode": _enum("PASSTHROUGH", "SIMPLE", "MUTUAL", "AUTO_PASSTHROUGH", "ISTIO_MUTUAL", "OPTIONAL_MUTUAL"),
        "serverCertificate": "string",
        "privateKey": "string",
        "caCertificates": "string",
        "caCrl": "string",
        "credentialName": "string",
        "credentialNames": _STRINGS,
        "tlsCertificates": ("list", "ServerTLSSettings.TLSCertificate"),
        "subjectAltNames": _STRINGS,
        "verifyCertificateSpki": _STRINGS,
        "verifyCertificateHash": _STRINGS,
        "minProtocolVersion": _enum("TLS_AUTO", "TLSV1_0", "TLSV1_1", "TLSV1_2", "TLSV1_3"),
        "maxProtocolVersion": _enum("TLS_AUTO", "TLSV1_0", "TLSV1_1", "TLSV1_2", "TLSV1_3"),
        "cipherSuites": _STRINGS,
        "insecureSkipVerify": "bool",
        "caCertCredentialName": "string",
    },
    "ServerTLSSettings.TLSCertificate": {
        "serverCertificate": "string",
        "privateKey": "string",
        "caCertificates": "string",
    },
    # ---------------------------------------------------------------- security.istio.io (v1, v1beta1: one schema)
    # From istio/api security/v1beta1/{authorization,peer_authentication,request_authentication}.proto and
    # type/v1beta1/selector.proto (PolicyTargetReference).
    "AuthorizationPolicy": {
        "selector": "istio.type.v1beta1.WorkloadSelector",
        "targetRef": "istio.type.v1beta1.PolicyTargetReference",
        "targetRefs": ("list", "istio.type.v1beta1.PolicyTargetReference"),
        "rules": ("list", "Rule"),
        "action": _enum("ALLOW", "DENY", "AUDIT", "CUSTOM"),
        "provider": "AuthorizationPolicy.ExtensionProvider",
    },
    "AuthorizationPolicy.ExtensionProvider": {
        "name": "string",
    },
    "Rule": {
        "from": ("list", "Rule.From"),
        "to": ("list", "Rule.To"),
        "when": ("list", "Condition"),
    },
    "Rule.From": {
        "source": "Source",
    },
    "Rule.To": {
        "operation": "Operation",
    },
    "Source": {
        "principals": _STRINGS,
        "notPrincipals": _STRINGS,
        "requestPrincipals": _STRINGS,
        "notRequestPrincipals": _STRINGS,
        "namespaces": _STRINGS,
        "notNamespaces": _STRINGS,
        "serviceAccounts": _STRINGS,
        "notServiceAccounts": _STRINGS,
        "trustDomains": _STRINGS,
        "notTrustDomains": _STRINGS,
        "ipBlocks": _STRINGS,
        "notIpBlocks": _STRINGS,
        "remoteIpBlocks": _STRINGS,
        "notRemoteIpBlocks": _STRINGS,
    },
    "Operation": {
        "hosts": _STRINGS,
        "notHosts": _STRINGS,
        "ports": _STRINGS,
        "notPorts": _STRINGS,
        "methods": _STRINGS,
        "notMethods": _STRINGS,
        "paths": _STRINGS,
        "notPaths": _STRINGS,
    },
    "Condition": {
        "key": "string",
        "values": _STRINGS,
        "notValues": _STRINGS,
    },
    "istio.type.v1beta1.PolicyTargetReference": {
        "group": "string",
        "kind": "string",
        "name": "string",
        "namespace": "string",
    },
    "PeerAuthentication": {
        "selector": "istio.type.v1beta1.WorkloadSelector",
        "mtls": "PeerAuthentication.MutualTLS",
        "portLevelMtls": ("portmap", "PeerAuthentication.MutualTLS"),
    },
    "PeerAuthentication.MutualTLS": {
        "mode": _enum("UNSET", "DISABLE", "PERMISSIVE", "STRICT"),
    },
    "RequestAuthentication": {
        "selector": "istio.type.v1beta1.WorkloadSelector",
        "targetRef": "istio.type.v1beta1.PolicyTargetReference",
        "targetRefs": ("list", "istio.type.v1beta1.PolicyTargetReference"),
        "jwtRules": ("list", "JWTRule"),
    },
    "JWTRule": {
        "issuer": "string",
        "audiences": _STRINGS,
        "jwksUri": "string",
        "jwks": "string",
        "fromHeaders": ("list", "JWTHeader"),
        "fromParams": _STRINGS,
        "fromCookies": _STRINGS,
        "outputPayloadToHeader": "string",
        "forwardOriginalToken": "bool",
        "outputClaimToHeaders": ("list", "ClaimToHeader"),
        "timeout": "duration",
    },
    "JWTHeader": {
        "name": "string",
        "prefix": "string",
    },
    "ClaimToHeader": {
        "header": "string",
        "claim": "string",
    },
}

# security.istio.io kinds (served as v1 and v1beta1), kept apart from KINDS: their group is another one.
SECURITY_KINDS: dict[str, str] = {
    "AuthorizationPolicy": "AuthorizationPolicy",
    "PeerAuthentication": "PeerAuthentication",
    "RequestAuthentication": "RequestAuthentication",
}

KINDS: dict[str, str] = {
    "VirtualService": "VirtualService",
    "DestinationRule": "DestinationRule",
    "ServiceEntry": "ServiceEntry",
    "Gateway": "Gateway",
    "WorkloadEntry": "WorkloadEntry",
}

# Proto oneofs: at most one field of each group may be set.
ONEOFS: dict[str, tuple[tuple[str, ...], ...]] = {
    "StringMatch": (("exact", "prefix", "regex"),),
    "HTTPRedirect": (("port", "derivePort"),),
    "HTTPBody": (("string", "bytes"),),
    "HTTPFaultInjection.Delay": (("fixedDelay", "exponentialDelay"),),
    "HTTPFaultInjection.Abort": (("httpStatus", "grpcStatus", "http2Error"),),
    "LoadBalancerSettings": (
        ("simple", "consistentHash"),
        # Zone-aware LB (Istio 1.31) is exclusive with locality LB settings.
        ("localityLbSetting", "zoneAwareLbSetting"),
    ),
    "LoadBalancerSettings.ConsistentHashLB": (
        ("httpHeaderName", "httpCookie", "useSourceIp", "httpQueryParameterName"),
        # The proto oneof is {ringHash, maglev}; Istio's validation also
        # rejects the deprecated top-level minimumRingSize next to either.
        ("ringHash", "maglev", "minimumRingSize"),
    ),
}

# Fields accepted with a warning: (message, field) -> what to use instead.
DEPRECATED: dict[tuple[str, str], str] = {
    ("HTTPFaultInjection.Delay", "percent"): "use percentage",
    ("HTTPFaultInjection.Abort", "percent"): "removed from the current Istio API; use percentage",
    ("HTTPRoute", "mirrorPercent"): "use mirrorPercentage",
    ("HTTPRoute", "mirror_percent"): "use mirrorPercentage",
    ("CorsPolicy", "allowOrigin"): "use allowOrigins",
    ("LoadBalancerSettings", "warmupDurationSecs"): "use warmup.duration",
    ("LoadBalancerSettings.ConsistentHashLB", "minimumRingSize"): "use ringHash.minimumRingSize",
    ("OutlierDetection", "consecutiveErrors"): "use consecutive5xxErrors or consecutiveGatewayErrors",
    ("Port", "targetPort"): "only meaningful on ServiceEntry ports",
}

# Enum values accepted with a warning: (message, field, value) -> what to use instead.
DEPRECATED_ENUM_VALUES: dict[tuple[str, str, str], str] = {
    ("LoadBalancerSettings", "simple", "LEAST_CONN"): "use LEAST_REQUEST",
}

# Kubernetes ObjectMeta.  Server-set fields are accepted so that
# `kubectl get -o yaml` output loads; timestamps are "value" because YAML
# may already have parsed them into datetime objects.
METADATA: dict[str, Type] = {
    "name": "string",
    "namespace": "string",
    "labels": ("map", "string"),
    "annotations": ("map", "string"),
    "generateName": "string",
    "uid": "string",
    "resourceVersion": "string",
    "generation": "int64",
    "creationTimestamp": "value",
    "deletionTimestamp": "value",
    "deletionGracePeriodSeconds": "int64",
    "finalizers": ("list", "string"),
    "ownerReferences": ("list", "struct"),
    "managedFields": ("list", "struct"),
    "selfLink": "string",
}
