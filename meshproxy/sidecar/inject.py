"""`meshproxy inject`: add the meshproxy sidecar to Kubernetes workloads, as `istioctl kube-inject` adds Istio's.

What is added follows Istio's injection template (istio/istio
`manifests/charts/istio-control/istio-discovery/files/injection-template.yaml`, sidecar mode, init-container
capture, default values): the `istio-init` init container (here `meshproxy iptables` with istio-iptables'
options, from the same `traffic.sidecar.istio.io/*` annotations), the `istio-proxy` container (here
`meshproxy run --transparent`, UID/GID 1337, port 15090, readiness and startup probes on 15021
`/healthz/ready`, the downward-API environment, Istio's default resources), the labels and annotations Istio
sets, and the routing config mounted from a ConfigMap. Container names are Istio's, so `kubectl logs -c
istio-proxy` and Istio's tooling find them.

Every other document passes through byte for byte and in order. Injecting twice equals injecting once: a pod
template that already carries `sidecar.istio.io/status` has what that status lists removed before injecting.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import yaml

from ..istio.problems import ConfigError, DocProblems, Problem
from ..istio.values import is_duration, parse_duration
from .iptables import DEFAULT_INBOUND_PORTS_EXCLUDE, CaptureConfig, CaptureConfigError, check, separate_v4_v6, split

SIDECAR = "istio-proxy"
INIT = "istio-init"
CONFIG_VOLUME = "meshproxy-config"
CONFIG_DIR = "/etc/meshproxy"
STATUS_PORT = "15020"  # the agent's status port: merged Prometheus stats, never captured inbound
HEALTH_PORT = 15021
PROXY_UID = 1337

# Pod-template annotations and labels Istio reads (istio.io/api annotation and label names).
INJECT = "sidecar.istio.io/inject"
STATUS = "sidecar.istio.io/status"
PROXY_CONFIG = "proxy.istio.io/config"
PROXY_IMAGE = "sidecar.istio.io/proxyImage"
INTERCEPTION_MODE = "sidecar.istio.io/interceptionMode"
TRAFFIC = "traffic.sidecar.istio.io/"
PROMETHEUS = "prometheus.io/"
PROMETHEUS_ENV = "ISTIO_PROMETHEUS_ANNOTATIONS"
GO_BOOLS = {**dict.fromkeys(("1", "t", "T", "TRUE", "true", "True"), True),
            **dict.fromkeys(("0", "f", "F", "FALSE", "false", "False"), False)}  # strconv.ParseBool
# pilot-agent's istioReservedPorts: never an app's metrics port
RESERVED_PORTS = {"15000": "admin", "15001": "outbound traffic capture", "15004": "pilot debug",
                  "15006": "inbound traffic capture", "15008": "HBONE tunnel",
                  "15020": "status / merged Prometheus", "15021": "health", "15053": "DNS proxy",
                  "15090": "proxy Prometheus (already merged)"}
RESOURCE_ANNOTATIONS = {"sidecar.istio.io/proxyCPU": ("requests", "cpu"),
                        "sidecar.istio.io/proxyMemory": ("requests", "memory"),
                        "sidecar.istio.io/proxyCPULimit": ("limits", "cpu"),
                        "sidecar.istio.io/proxyMemoryLimit": ("limits", "memory")}
# values.yaml global.proxy.resources
DEFAULT_RESOURCES = {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "2000m", "memory": "1024Mi"}}

# kind -> path of the pod template in the object (Pod: the object itself)
POD_TEMPLATES: dict[str, tuple[str, ...]] = {
    "Pod": (),
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
}
DOCUMENT_START = re.compile(r"^---(?=[ \t\r\n]|$)", re.MULTILINE)


class PlainDumper(yaml.SafeDumper):
    """No `&id001` anchors for shared values: a manifest reads as written out in full."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


@dataclass(frozen=True, slots=True)
class InjectOptions:
    image: str = "meshproxy:latest"
    config_map: str = "meshproxy-config"
    revision: str = "default"
    # `security.istio.io/tlsMode: istio` tells Envoy peers to send mutual TLS; off until meshproxy accepts it.
    tls_mode_label: bool = False
    # meshConfig.defaultConfig.holdApplicationUntilProxyStarts; a pod's proxy.istio.io/config overrides it.
    hold_application_until_proxy_starts: bool = False


def inject_text(text: str, source: str, options: InjectOptions) -> tuple[str, list[Problem]]:
    """The stream with its workloads injected and every other document as it was, and the warnings.

    ConfigError (every problem, each naming file, document and field) when a workload cannot be injected."""
    problems: list[Problem] = []
    out: list[str] = []
    for index, (marker, body) in enumerate(documents(text)):
        where = DocProblems(source, index, problems)
        try:
            doc = yaml.safe_load(body)
        except yaml.YAMLError as exc:
            where.error("", f"not valid YAML: {exc}")
            continue
        injected = inject_object(doc, where, options) if isinstance(doc, dict) else None
        if injected is None or where.errors:
            out.append(marker + body)
        else:
            out.append(marker + leading_comments(body)
                       + yaml.dump(injected, Dumper=PlainDumper, sort_keys=False, width=120))
    if any(p.severity == "error" for p in problems):
        raise ConfigError(problems)
    return "".join(out), problems


def documents(text: str) -> list[tuple[str, str]]:
    """The stream's documents as (marker line, body) text, split at `---` lines (markers sit in column 0).

    Joining them gives the text back byte for byte; the first has no marker when the stream starts without one."""
    starts = [m.start() for m in DOCUMENT_START.finditer(text)]
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    found = []
    for n, start in enumerate(starts):
        chunk = text[start:starts[n + 1] if n + 1 < len(starts) else len(text)]
        if DOCUMENT_START.match(chunk):
            line_end = chunk.find("\n") + 1 or len(chunk)
            found.append((chunk[:line_end], chunk[line_end:]))
        else:
            found.append(("", chunk))
    return found


def leading_comments(chunk: str) -> str:
    """The comment lines above a document, kept when the document itself is re-written."""
    kept = []
    for line in chunk.splitlines(keepends=True):
        if line.strip() and not line.lstrip().startswith("#"):
            break
        kept.append(line)
    return "".join(kept)


def inject_object(doc: dict[str, Any], where: DocProblems, options: InjectOptions) -> dict[str, Any] | None:
    """The object with its pod template(s) injected, or None when nothing changes (not a workload, opted out)."""
    kind = doc.get("kind")
    if kind == "List" and isinstance(doc.get("items"), list):
        changed = False
        items = []
        for n, item in enumerate(doc["items"]):
            result = inject_object(item, _Nested(where, f"items[{n}]."), options) if isinstance(item, dict) else None
            changed |= result is not None
            items.append(item if result is None else result)
        return {**doc, "items": items} if changed else None
    if not isinstance(kind, str) or kind not in POD_TEMPLATES:
        return None
    path = POD_TEMPLATES[kind]
    template: Any = doc
    for n, key in enumerate(path):
        template = template.get(key) if isinstance(template, dict) else None
        if not isinstance(template, dict):
            where.error(".".join(path[:n + 1]), f"a {kind} needs this mapping to inject into")
            return None
    prefix = ".".join(path) + "." if path else ""
    metadata = doc["metadata"] if isinstance(doc.get("metadata"), dict) else {}
    workload = str(metadata.get("name") or metadata.get("generateName") or "").rstrip("-") or kind.lower()
    injected = inject_pod(template, _Nested(where, prefix), workload, options)
    if injected is None:
        return None
    result = dict(doc)
    if not path:
        return injected
    # rebuild the path down to the template so the input object is left as it was
    parent = result
    for key in path[:-1]:
        parent[key] = dict(parent[key])
        parent = parent[key]
    parent[path[-1]] = injected
    return result


class _Nested(DocProblems):
    """The same document's problems, with a field-path prefix (the pod template's place in the object)."""

    __slots__ = ("outer", "prefix")

    def __init__(self, outer: DocProblems, prefix: str) -> None:
        super().__init__(outer.file, outer.index, outer.problems)
        self.outer, self.prefix = outer, prefix

    def error(self, path: str, message: str) -> None:
        self.outer.error(self.prefix + path, message)
        self.errors += 1

    def warn(self, path: str, message: str) -> None:
        self.outer.warn(self.prefix + path, message)


def inject_pod(template: dict[str, Any], where: DocProblems, workload: str,
               options: InjectOptions) -> dict[str, Any] | None:
    """A pod (or pod template) with the sidecar; None when it opts out or runs on the host network."""
    metadata = mapping(template, "metadata", "metadata", where)
    spec = mapping(template, "spec", "spec", where)
    labels = mapping(metadata, "labels", "metadata.labels", where)
    annotations = mapping(metadata, "annotations", "metadata.annotations", where)
    if where.errors:
        return None
    # Kubernetes reads label and annotation values as strings: decide on their text, write back what was there.
    read_labels = {str(k): text(v) for k, v in labels.items()}
    read_annotations = {str(k): text(v) for k, v in annotations.items()}
    if spec.get("hostNetwork") is True or not injection_wanted(read_labels, read_annotations, where):
        return None
    if not isinstance(spec.get("containers"), list) or not spec["containers"]:
        where.error("spec.containers", "a pod needs at least one container")
        return None
    previous_scrape = remove_previous_injection(spec, annotations, where)
    read_annotations.pop(STATUS, None)

    mode = read_annotations.get(INTERCEPTION_MODE, "REDIRECT")
    if mode not in ("REDIRECT", "NONE"):
        where.error(f"metadata.annotations['{INTERCEPTION_MODE}']",
                    f"{mode!r}: meshproxy supports REDIRECT (and NONE: no capture), not TPROXY")
        return None
    capture = capture_args(read_annotations, where) if mode == "REDIRECT" else None
    hold = hold_application(read_annotations, where, options.hold_application_until_proxy_starts)
    drain = drain_time(read_annotations, where) if not where.errors else None
    if where.errors:
        return None

    app_containers = [str(c.get("name")) for c in spec["containers"] if isinstance(c, dict)]
    labels.setdefault("service.istio.io/canonical-name", canonical_name(read_labels, workload))
    labels.setdefault("service.istio.io/canonical-revision", read_labels.get("app.kubernetes.io/version")
                      or read_labels.get("version") or "latest")
    if options.tls_mode_label:
        labels.setdefault("security.istio.io/tlsMode", "istio")
    annotations["istio.io/rev"] = options.revision
    annotations.setdefault("kubectl.kubernetes.io/default-logs-container", app_containers[0])
    annotations.setdefault("kubectl.kubernetes.io/default-container", app_containers[0])
    scrape = prometheus_merge(annotations, previous_scrape, where)
    if where.errors:
        return None

    image = read_annotations.get(PROXY_IMAGE, options.image)
    resources = proxy_resources(read_annotations)
    sidecar = sidecar_container(image, workload, {str(k): text(v) for k, v in labels.items()}, resources, hold)
    if drain is not None:
        sidecar["args"] += ["--drain-time", f"{drain:g}"]
    if scrape is not None:
        sidecar["env"].append({"name": PROMETHEUS_ENV, "value": scrape})
    init = init_container(image, capture, resources) if capture is not None else None
    spec["containers"] = [sidecar, *spec["containers"]] if hold else [*spec["containers"], sidecar]
    if init is not None:
        spec["initContainers"] = [*(spec.get("initContainers") or []), init]
    spec["volumes"] = [*(spec.get("volumes") or []), {"name": CONFIG_VOLUME,
                                                      "configMap": {"name": options.config_map}}]
    annotations[STATUS] = json.dumps({"initContainers": [INIT] if init is not None else [],
                                      "containers": [SIDECAR], "volumes": [CONFIG_VOLUME],
                                      "imagePullSecrets": None, "revision": options.revision},
                                     separators=(",", ":"))
    metadata["labels"] = labels
    metadata["annotations"] = annotations
    return {**template, "metadata": metadata, "spec": spec}


def mapping(parent: dict[str, Any], key: str, path: str, where: DocProblems) -> dict[str, Any]:
    """A copy of parent[key], a mapping or absent (then empty); anything else is an error at `path`."""
    value = parent.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        where.error(path, f"must be a mapping, not {type(value).__name__}")
        return {}
    return dict(value)


def text(value: Any) -> str:
    """A YAML scalar as the string Kubernetes would need it to be (true -> "true", not "True")."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def injection_wanted(labels: dict[str, str], annotations: dict[str, str], where: DocProblems) -> bool:
    """injectRequired: the label wins over the annotation; only "true" and "false" mean something."""
    value = labels.get(INJECT, annotations.get(INJECT, ""))
    if value not in ("", "true", "false"):
        place = "labels" if INJECT in labels else "annotations"
        where.warn(f"metadata.{place}['{INJECT}']", f"{value!r}: only 'true' and 'false' are accepted; injecting")
    return value != "false"


def remove_previous_injection(spec: dict[str, Any], annotations: dict[str, Any], where: DocProblems) -> str | None:
    """What an earlier injection added (its sidecar.istio.io/status lists it) goes, so re-injecting is exact.

    Returns the app's Prometheus settings the old sidecar carried (its annotations now point at the sidecar)."""
    if STATUS not in annotations:
        return None
    try:
        status = json.loads(annotations.pop(STATUS))
        names = {key: set(status.get(key) or ()) for key in ("initContainers", "containers", "volumes")}
    except (ValueError, AttributeError, TypeError):
        where.error(f"metadata.annotations['{STATUS}']", "not the JSON status an injection writes")
        return None
    scrape = None
    for old in spec.get("containers") or ():
        if isinstance(old, dict) and old.get("name") in names["containers"]:
            for env in old.get("env") or ():
                if isinstance(env, dict) and env.get("name") == PROMETHEUS_ENV:
                    scrape = str(env.get("value"))
    for key, field in (("initContainers", "initContainers"), ("containers", "containers"), ("volumes", "volumes")):
        if isinstance(spec.get(field), list):
            kept = [item for item in spec[field] if not (isinstance(item, dict) and item.get("name") in names[key])]
            if kept or field == "containers":
                spec[field] = kept
            else:
                del spec[field]
    return scrape


def prometheus_merge(annotations: dict[str, Any], previous: str | None, where: DocProblems) -> str | None:
    """applyPrometheusMerge: Prometheus scrapes the sidecar's merged stats on 15020; the app's own prometheus.io
    settings move to ISTIO_PROMETHEUS_ANNOTATIONS (what the stats merger scrapes). Returns that value, if any.

    A pod with `prometheus.io/scrape: "false"` is left alone."""
    if GO_BOOLS.get(text(annotations.get(PROMETHEUS + "scrape", "true"))) is False:
        return None
    if text(annotations.get(PROMETHEUS + "port")) == STATUS_PORT:
        return previous  # already pointing at the sidecar: an earlier injection moved the app's settings
    app = {key: text(annotations.get(PROMETHEUS + key)) for key in ("scrape", "path", "port")}
    if app["port"]:
        place = f"metadata.annotations['{PROMETHEUS}port']"
        if not app["port"].isdigit() or not 0 < int(app["port"]) < 65536:
            where.error(place, f"invalid port {app['port']!r}")
        elif str(int(app["port"])) in RESERVED_PORTS:
            where.error(place, f"port {app['port']} is reserved for the sidecar "
                               f"({RESERVED_PORTS[str(int(app['port']))]}) and cannot be scraped")
    for key in ("port", "path", "scrape"):
        annotations.pop(PROMETHEUS + key, None)
    annotations[PROMETHEUS + "port"] = STATUS_PORT
    annotations[PROMETHEUS + "path"] = "/stats/prometheus"
    annotations[PROMETHEUS + "scrape"] = "true"
    return json.dumps(app, separators=(",", ":")) if any(app.values()) else None


def canonical_name(labels: dict[str, str], workload: str) -> str:
    """service.istio.io/canonical-name: app.kubernetes.io/name, app, else the workload; trunc 63, trimAll "-_."."""
    name = labels.get("app.kubernetes.io/name") or labels.get("app") or workload
    return name[:63].strip("-_.")


def capture_args(annotations: dict[str, str], where: DocProblems) -> list[str]:
    """`meshproxy iptables` options for these annotations, as the template builds istio-iptables' args."""
    def annotation(name: str, default: str) -> str:
        return annotations.get(TRAFFIC + name, default).strip()

    exclude_inbound = exclude_status_port(annotation("excludeInboundPorts", ""))
    args = ["iptables", "-p", "15001", "-z", "15006", "-u", str(PROXY_UID), "-m", "REDIRECT",
            "-i", annotation("includeOutboundIPRanges", "*"), "-x", annotation("excludeOutboundIPRanges", ""),
            "-b", annotation("includeInboundPorts", "*"),
            "-d", ",".join(DEFAULT_INBOUND_PORTS_EXCLUDE[:2] + split(exclude_inbound))]
    if TRAFFIC + "includeOutboundPorts" in annotations:
        args += ["-q", annotation("includeOutboundPorts", "")]
    if TRAFFIC + "excludeOutboundPorts" in annotations:
        args += ["-o", annotation("excludeOutboundPorts", "")]
    virt = annotations.get("istio.io/reroute-virtual-interfaces", annotations.get(TRAFFIC + "kubevirtInterfaces"))
    if virt is not None:
        args += ["-k", virt.strip()]
    if TRAFFIC + "excludeInterfaces" in annotations:
        args += ["-c", annotation("excludeInterfaces", "")]
    check_capture(args, annotations, where)
    return args


def exclude_status_port(excluded: str) -> str:
    """excludeInboundPort (template.go): the status port joins the excluded ports unless already there."""
    ports = [p.strip() for p in excluded.split(",") if p.strip()]
    return excluded if STATUS_PORT in ports else ",".join([*ports, STATUS_PORT])


def check_capture(args: list[str], annotations: dict[str, str], where: DocProblems) -> None:
    """Bad annotation values are errors at injection time, named by annotation, not a crash-looping init."""
    values = dict(zip(args[1::2], args[2::2]))
    checks = [("includeOutboundIPRanges", lambda: separate_v4_v6("-i", values["-i"])),
              ("excludeOutboundIPRanges", lambda: check(CaptureConfig(outbound_ip_ranges_exclude=values["-x"]))),
              ("includeInboundPorts", lambda: check(CaptureConfig(inbound_ports_include=values["-b"]))),
              ("excludeInboundPorts", lambda: check(CaptureConfig(inbound_ports_exclude=split(values["-d"])))),
              ("includeOutboundPorts", lambda: check(CaptureConfig(outbound_ports_include=split(values.get("-q", ""))))),
              ("excludeOutboundPorts", lambda: check(CaptureConfig(outbound_ports_exclude=split(values.get("-o", "")))))]
    for name, run in checks:
        try:
            run()
        except CaptureConfigError as exc:
            message = str(exc).split(": ", 1)[-1]
            where.error(f"metadata.annotations['{TRAFFIC}{name}']", message)


def proxy_config(annotations: dict[str, str], where: DocProblems) -> dict[str, Any]:
    """proxy.istio.io/config (a ProxyConfig in YAML or JSON); {} when absent or malformed (an error then)."""
    if PROXY_CONFIG not in annotations:
        return {}
    place = f"metadata.annotations['{PROXY_CONFIG}']"
    try:
        config = yaml.safe_load(annotations[PROXY_CONFIG]) or {}
    except yaml.YAMLError as exc:
        where.error(place, f"not valid YAML: {exc}")
        return {}
    if not isinstance(config, dict):
        where.error(place, "must be a ProxyConfig mapping")
        return {}
    return config


def drain_time(annotations: dict[str, str], where: DocProblems) -> float | None:
    """proxy.istio.io/config's terminationDrainDuration (seconds), for the sidecar's --drain-time; None: the mesh's."""
    raw = proxy_config(annotations, where).get("terminationDrainDuration")
    if raw is None:
        return None
    if not isinstance(raw, str) or not is_duration(raw):
        where.error(f"metadata.annotations['{PROXY_CONFIG}'].terminationDrainDuration",
                    f"{raw!r} is not a duration (e.g. 5s)")
        return None
    return parse_duration(raw)


def hold_application(annotations: dict[str, str], where: DocProblems, default: bool) -> bool:
    """proxy.istio.io/config's holdApplicationUntilProxyStarts, else the default."""
    if PROXY_CONFIG not in annotations:
        return default
    place = f"metadata.annotations['{PROXY_CONFIG}']"
    config = proxy_config(annotations, where)
    value = config.get("holdApplicationUntilProxyStarts", default)
    if not isinstance(value, bool):
        where.error(f"{place}.holdApplicationUntilProxyStarts", f"{value!r} is not a boolean")
        return default
    return value


def proxy_resources(annotations: dict[str, str]) -> dict[str, dict[str, str]]:
    """The template's `resources`: the four sidecar.istio.io/proxy* annotations when any is set, else defaults."""
    chosen: dict[str, dict[str, str]] = {}
    for name, (kind, resource) in RESOURCE_ANNOTATIONS.items():
        if name in annotations:
            chosen.setdefault(kind, {})[resource] = annotations[name]
    return chosen or {kind: dict(values) for kind, values in DEFAULT_RESOURCES.items()}


def field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def sidecar_container(image: str, workload: str, labels: dict[str, str], resources: dict[str, dict[str, str]],
                      hold: bool) -> dict[str, Any]:
    args = ["run", "--transparent", "--config", CONFIG_DIR, "--workload", workload,
            "--namespace", "$(POD_NAMESPACE)"]
    if labels:
        args += ["--label", ",".join(f"{k}={v}" for k, v in labels.items())]
    probe = {"httpGet": {"path": "/healthz/ready", "port": HEALTH_PORT}}
    container: dict[str, Any] = {
        "name": SIDECAR,
        "image": image,
        "command": ["meshproxy"],
        "args": args,
        "ports": [{"containerPort": 15090, "protocol": "TCP", "name": "http-envoy-prom"}],
        "env": [field_env("POD_NAME", "metadata.name"), field_env("POD_NAMESPACE", "metadata.namespace"),
                field_env("INSTANCE_IP", "status.podIP"), field_env("SERVICE_ACCOUNT", "spec.serviceAccountName")],
        "readinessProbe": {**probe, "initialDelaySeconds": 0, "periodSeconds": 15, "timeoutSeconds": 3,
                           "failureThreshold": 4},
        "startupProbe": {**probe, "initialDelaySeconds": 0, "periodSeconds": 1, "timeoutSeconds": 3,
                         "failureThreshold": 600},
        "resources": resources,
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                            "privileged": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
                            "runAsUser": PROXY_UID, "runAsGroup": PROXY_UID},
        "volumeMounts": [{"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True}],
    }
    if hold:  # the kubelet starts the app only once this hook returns: the proxy is ready (pilot-agent wait)
        container["lifecycle"] = {"postStart": {"exec": {"command": ["meshproxy", "wait"]}}}
    return container


def init_container(image: str, capture: list[str], resources: dict[str, dict[str, str]]) -> dict[str, Any]:
    return {
        "name": INIT,
        "image": image,
        "command": ["meshproxy"],
        "args": capture,
        "resources": resources,
        "securityContext": {"allowPrivilegeEscalation": False, "privileged": False,
                            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
                            "readOnlyRootFilesystem": False, "runAsGroup": 0, "runAsNonRoot": False,
                            "runAsUser": 0},
    }
