"""`meshproxy inject`: Istio's bookinfo.yaml and hand-made workloads, checked field by field and against the
Kubernetes OpenAPI schemas (kubernetes-validate, offline, strict: no unknown field)."""

from __future__ import annotations

import dataclasses
import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from meshproxy.cli import main
from meshproxy.istio.problems import ConfigError
from meshproxy.sidecar.commands import parse_iptables_args
from meshproxy.sidecar.inject import InjectOptions, documents, inject_text
from meshproxy.sidecar.iptables import CaptureConfig, build, restore_text

BOOKINFO = Path(__file__).resolve().parents[1] / "corpus" / "istio-samples" / "bookinfo.yaml"
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod"}


def inject(text: str, **options: Any) -> str:
    return inject_text(text, "manifest.yaml", InjectOptions(**options))[0]


def pod_template(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "Pod":
        return doc
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]
    return doc["spec"]["template"]


def container(pod: dict[str, Any], name: str, field: str = "containers") -> dict[str, Any]:
    found = [c for c in pod["spec"].get(field, []) if c["name"] == name]
    assert len(found) == 1, f"{len(found)} {field} named {name}"
    return found[0]


def env_fields(sidecar: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in sidecar["env"] if "valueFrom" in e}


@pytest.fixture(scope="module")
def bookinfo() -> tuple[str, str]:
    text = BOOKINFO.read_text()
    return text, inject(text)


def test_each_bookinfo_workload_gets_the_sidecar_and_the_capture(bookinfo: tuple[str, str]) -> None:
    _, out = bookinfo
    deployments = [d for d in yaml.safe_load_all(out) if d and d["kind"] == "Deployment"]
    assert [d["metadata"]["name"] for d in deployments] == ["details-v1", "ratings-v1", "reviews-v1", "reviews-v2",
                                                             "reviews-v3", "productpage-v1"]
    for deployment in deployments:
        name, pod = deployment["metadata"]["name"], pod_template(deployment)
        app, version = pod["metadata"]["labels"]["app"], pod["metadata"]["labels"]["version"]
        sidecar = container(pod, "istio-proxy")
        assert pod["spec"]["containers"][0]["name"] == app and pod["spec"]["containers"][-1] is sidecar
        assert sidecar["image"] == "meshproxy:latest" and sidecar["command"] == ["meshproxy"]
        assert sidecar["args"][:8] == ["run", "--transparent", "--config", "/etc/meshproxy", "--workload", name,
                                       "--namespace", "$(POD_NAMESPACE)"]
        assert f"app={app}" in sidecar["args"][9].split(",") and f"version={version}" in sidecar["args"][9].split(",")
        assert sidecar["ports"] == [{"containerPort": 15090, "protocol": "TCP", "name": "http-envoy-prom"}]
        assert sidecar["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021}
        assert env_fields(sidecar) == {"POD_NAME": "metadata.name", "POD_NAMESPACE": "metadata.namespace",
                                       "INSTANCE_IP": "status.podIP", "SERVICE_ACCOUNT": "spec.serviceAccountName"}
        security = sidecar["securityContext"]
        assert (security["runAsUser"], security["runAsGroup"], security["runAsNonRoot"]) == (1337, 1337, True)
        assert security["capabilities"] == {"drop": ["ALL"]} and security["allowPrivilegeEscalation"] is False
        assert sidecar["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"},
                                        "limits": {"cpu": "2000m", "memory": "1024Mi"}}
        assert "lifecycle" not in sidecar
        assert sidecar["volumeMounts"] == [{"name": "meshproxy-config", "mountPath": "/etc/meshproxy",
                                            "readOnly": True}]
        assert {"name": "meshproxy-config", "configMap": {"name": "meshproxy-config"}} in pod["spec"]["volumes"]

        init = container(pod, "istio-init", "initContainers")
        assert init["command"] == ["meshproxy"] and init["args"][0] == "iptables"
        assert init["securityContext"]["capabilities"] == {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}
        assert init["securityContext"]["runAsUser"] == 0
        assert dataclasses.replace(parse_iptables_args(init["args"][1:]), ipv6=False) == CaptureConfig()

        labels, annotations = pod["metadata"]["labels"], pod["metadata"]["annotations"]
        assert labels["service.istio.io/canonical-name"] == app
        assert labels["service.istio.io/canonical-revision"] == version
        assert "security.istio.io/tlsMode" not in labels  # no mutual TLS yet: Envoy peers must not send it
        assert annotations["kubectl.kubernetes.io/default-container"] == app
        assert annotations["istio.io/rev"] == "default"
        # Prometheus scrapes the sidecar's merged stats; productpage's own settings move to the sidecar's env.
        assert (annotations["prometheus.io/scrape"], annotations["prometheus.io/port"],
                annotations["prometheus.io/path"]) == ("true", "15020", "/stats/prometheus")
        app_scrape = [e["value"] for e in sidecar["env"] if e["name"] == "ISTIO_PROMETHEUS_ANNOTATIONS"]
        assert app_scrape == (['{"scrape":"true","path":"/metrics","port":"9080"}'] if app == "productpage" else [])
        assert json.loads(annotations["sidecar.istio.io/status"]) == {
            "initContainers": ["istio-init"], "containers": ["istio-proxy"], "volumes": ["meshproxy-config"],
            "imagePullSecrets": None, "revision": "default"}
        assert deployment["spec"]["selector"]["matchLabels"] == {"app": app, "version": version}  # untouched


def test_other_documents_pass_through_byte_for_byte_in_order(bookinfo: tuple[str, str]) -> None:
    text, out = bookinfo
    before, after = documents(text), documents(out)
    assert len(before) == len(after)
    for (marker, body), (marker_out, body_out) in zip(before, after):
        doc = yaml.safe_load(body)
        assert marker_out == marker
        if not doc or doc["kind"] not in WORKLOAD_KINDS:
            assert body_out == body
        else:
            assert yaml.safe_load(body_out)["metadata"] == doc["metadata"]
            assert body_out.startswith(body[:body.index("apiVersion")])  # its comment header is kept


def test_injecting_twice_equals_injecting_once(bookinfo: tuple[str, str]) -> None:
    _, out = bookinfo
    assert inject(out) == out


def test_reinjecting_with_other_options_replaces_the_sidecar(bookinfo: tuple[str, str]) -> None:
    _, out = bookinfo
    again = [d for d in yaml.safe_load_all(inject(out, image="registry.local/meshproxy:2", config_map="routes"))
             if d and d["kind"] == "Deployment"]
    for deployment in again:
        pod = pod_template(deployment)
        assert container(pod, "istio-proxy")["image"] == "registry.local/meshproxy:2"
        assert container(pod, "istio-init", "initContainers")["image"] == "registry.local/meshproxy:2"
        assert [v for v in pod["spec"]["volumes"] if v["name"] == "meshproxy-config"] == [
            {"name": "meshproxy-config", "configMap": {"name": "routes"}}]


def validate(text: str) -> int:
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed")
    version = kubernetes_validate.latest_version()
    count = 0
    for doc in yaml.safe_load_all(text):
        if doc:
            kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError naming the field
            count += 1
    return count


def test_injected_bookinfo_validates_against_the_kubernetes_schemas(bookinfo: tuple[str, str]) -> None:
    assert validate(bookinfo[1]) == 14


def test_every_option_still_gives_valid_manifests(bookinfo: tuple[str, str]) -> None:
    out = inject(bookinfo[0], hold_application_until_proxy_starts=True, tls_mode_label=True, revision="canary")
    assert validate(out) == 14
    assert out.count("postStart:") == 6


def test_the_schema_check_catches_a_wrong_field(bookinfo: tuple[str, str]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed")
    broken = bookinfo[1].replace("readOnlyRootFilesystem: true", "readOnlyRootFileSystem: true", 1)
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)


ALL_KINDS = textwrap.dedent("""\
    apiVersion: v1
    kind: Pod
    metadata: {name: solo, labels: {app: solo}}
    spec:
      containers: [{name: app, image: busybox}]
    ---
    apiVersion: apps/v1
    kind: StatefulSet
    metadata: {name: db}
    spec:
      serviceName: db
      selector: {matchLabels: {app.kubernetes.io/name: db}}
      template:
        metadata: {labels: {app.kubernetes.io/name: db, app.kubernetes.io/version: "15"}}
        spec: {containers: [{name: postgres, image: postgres}]}
    ---
    apiVersion: apps/v1
    kind: DaemonSet
    metadata: {name: agent}
    spec:
      selector: {matchLabels: {name: agent}}
      template:
        metadata: {labels: {name: agent}}
        spec: {containers: [{name: agent, image: agent}]}
    ---
    apiVersion: batch/v1
    kind: Job
    metadata: {name: once}
    spec:
      template:
        spec: {restartPolicy: Never, containers: [{name: task, image: task}]}
    ---
    apiVersion: batch/v1
    kind: CronJob
    metadata: {name: nightly}
    spec:
      schedule: "0 3 * * *"
      jobTemplate:
        spec:
          template:
            metadata: {labels: {app: nightly}}
            spec: {restartPolicy: OnFailure, containers: [{name: task, image: task}]}
    ---
    apiVersion: v1
    kind: ConfigMap
    metadata: {name: meshproxy-config}
    data: {routes.yaml: ""}
    """)


def test_every_workload_kind_is_injected_and_valid() -> None:
    out = inject(ALL_KINDS)
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert [d["kind"] for d in docs] == ["Pod", "StatefulSet", "DaemonSet", "Job", "CronJob", "ConfigMap"]
    for doc in docs[:5]:
        pod = pod_template(doc)
        container(pod, "istio-proxy")
        container(pod, "istio-init", "initContainers")
        assert "--workload" in container(pod, "istio-proxy")["args"]
    workloads = [container(pod_template(d), "istio-proxy")["args"][5] for d in docs[:5]]
    assert workloads == ["solo", "db", "agent", "once", "nightly"]
    labels = pod_template(docs[1])["metadata"]["labels"]  # app.kubernetes.io/* first, as Istio
    assert (labels["service.istio.io/canonical-name"], labels["service.istio.io/canonical-revision"]) == ("db", "15")
    labels = pod_template(docs[3])["metadata"]["labels"]  # no labels at all: the workload's name, "latest"
    assert (labels["service.istio.io/canonical-name"], labels["service.istio.io/canonical-revision"]) == ("once",
                                                                                                         "latest")
    assert validate(out) == 6
    assert inject(out) == out


def one_deployment(annotations: dict[str, str] | None = None, labels: dict[str, str] | None = None,
                   host_network: bool = False) -> str:
    template: dict[str, Any] = {"metadata": {"labels": {"app": "web", **(labels or {})}},
                                "spec": {"containers": [{"name": "web", "image": "nginx"}]}}
    if annotations:
        template["metadata"]["annotations"] = annotations
    if host_network:
        template["spec"]["hostNetwork"] = True
    return yaml.safe_dump({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
                           "spec": {"selector": {"matchLabels": {"app": "web"}}, "template": template}},
                          sort_keys=False)


def injected_pod(text: str, **options: Any) -> dict[str, Any]:
    return pod_template(yaml.safe_load(inject(text, **options)))


@pytest.mark.parametrize("manifest", [
    one_deployment(annotations={"sidecar.istio.io/inject": "false"}),
    one_deployment(labels={"sidecar.istio.io/inject": "false"}),
    one_deployment(labels={"sidecar.istio.io/inject": "false"}, annotations={"sidecar.istio.io/inject": "true"}),
    one_deployment(host_network=True),
], ids=["annotation-false", "label-false", "label-wins-over-annotation", "host-network"])
def test_opted_out_workloads_are_left_as_they_are(manifest: str) -> None:
    assert inject(manifest) == manifest


def test_the_label_wins_over_the_annotation_both_ways() -> None:
    pod = injected_pod(one_deployment(labels={"sidecar.istio.io/inject": "true"},
                                      annotations={"sidecar.istio.io/inject": "false"}))
    container(pod, "istio-proxy")


def test_an_invalid_inject_value_warns_and_injects() -> None:
    out, problems = inject_text(one_deployment(annotations={"sidecar.istio.io/inject": "no"}), "m.yaml",
                                InjectOptions())
    container(pod_template(yaml.safe_load(out)), "istio-proxy")
    assert [str(p) for p in problems] == [
        "m.yaml:0: spec.template.metadata.annotations['sidecar.istio.io/inject']: warning: 'no': only 'true' and "
        "'false' are accepted; injecting"]


def test_traffic_annotations_become_the_init_containers_capture_rules() -> None:
    annotations = {
        "traffic.sidecar.istio.io/includeInboundPorts": "9080",
        "traffic.sidecar.istio.io/excludeInboundPorts": "8081",
        "traffic.sidecar.istio.io/excludeOutboundPorts": "3306,6379",
        "traffic.sidecar.istio.io/includeOutboundIPRanges": "10.0.0.0/8,fd00::/8",
        "traffic.sidecar.istio.io/excludeOutboundIPRanges": "10.96.0.0/12,169.254.169.254/32",
    }
    init = container(injected_pod(one_deployment(annotations)), "istio-init", "initContainers")
    parsed = dataclasses.replace(parse_iptables_args(init["args"][1:]), ipv6=True)
    expected = CaptureConfig(inbound_ports_include="9080", inbound_ports_exclude=("15090", "15021", "8081", "15020"),
                             outbound_ports_exclude=("3306", "6379"),
                             outbound_ip_ranges_include="10.0.0.0/8,fd00::/8",
                             outbound_ip_ranges_exclude="10.96.0.0/12,169.254.169.254/32", ipv6=True)
    assert parsed == expected
    v4, v6 = restore_text(build(parsed), 4), restore_text(build(parsed), 6)
    assert v4 == restore_text(build(expected), 4) and v6 == restore_text(build(expected), 6)
    for rule in ("-A ISTIO_INBOUND -p tcp --dport 9080 -j ISTIO_IN_REDIRECT",
                 "-A ISTIO_OUTPUT -p tcp --dport 3306 -j RETURN", "-A ISTIO_OUTPUT -p udp --dport 6379 -j RETURN",
                 "-A ISTIO_OUTPUT -d 10.96.0.0/12 -j RETURN", "-A ISTIO_OUTPUT -d 169.254.169.254/32 -j RETURN",
                 "-A ISTIO_OUTPUT -d 10.0.0.0/8 -j ISTIO_REDIRECT"):
        assert rule in v4.splitlines()
    assert "-A ISTIO_OUTPUT -d fd00::/8 -j ISTIO_REDIRECT" in v6.splitlines()
    assert "-A ISTIO_OUTPUT -j ISTIO_REDIRECT" not in v4.splitlines()  # only the included ranges


def test_the_status_port_is_not_excluded_twice() -> None:
    init = container(injected_pod(one_deployment({"traffic.sidecar.istio.io/excludeInboundPorts": "15020,7000"})),
                     "istio-init", "initContainers")
    assert init["args"][init["args"].index("-d") + 1] == "15090,15021,15020,7000"


@pytest.mark.parametrize(("proxy_config", "default", "held"), [
    ("holdApplicationUntilProxyStarts: true", False, True),
    ('{"holdApplicationUntilProxyStarts": false}', True, False),
    (None, True, True),
    (None, False, False),
])
def test_hold_application_until_proxy_starts(proxy_config: str | None, default: bool, held: bool) -> None:
    annotations = {"proxy.istio.io/config": proxy_config} if proxy_config else None
    pod = injected_pod(one_deployment(annotations), hold_application_until_proxy_starts=default)
    names = [c["name"] for c in pod["spec"]["containers"]]
    sidecar = container(pod, "istio-proxy")
    if held:  # the sidecar starts first and the kubelet waits for its postStart hook: ready
        assert names == ["istio-proxy", "web"]
        assert sidecar["lifecycle"] == {"postStart": {"exec": {"command": ["meshproxy", "wait"]}}}
    else:
        assert names == ["web", "istio-proxy"] and "lifecycle" not in sidecar


def test_options_and_per_pod_overrides() -> None:
    pod = injected_pod(one_deployment({"sidecar.istio.io/proxyImage": "mine/meshproxy:dev",
                                       "sidecar.istio.io/proxyCPU": "50m", "sidecar.istio.io/proxyMemoryLimit": "1Gi"}),
                       tls_mode_label=True, revision="canary")
    sidecar = container(pod, "istio-proxy")
    assert sidecar["image"] == "mine/meshproxy:dev"
    assert sidecar["resources"] == {"requests": {"cpu": "50m"}, "limits": {"memory": "1Gi"}}
    assert pod["metadata"]["labels"]["security.istio.io/tlsMode"] == "istio"
    assert pod["metadata"]["annotations"]["istio.io/rev"] == "canary"


def test_interception_mode_none_has_no_init_container() -> None:
    pod = injected_pod(one_deployment({"sidecar.istio.io/interceptionMode": "NONE"}))
    assert "initContainers" not in pod["spec"]
    assert json.loads(pod["metadata"]["annotations"]["sidecar.istio.io/status"])["initContainers"] == []


@pytest.mark.parametrize(("manifest", "message"), [
    (one_deployment({"traffic.sidecar.istio.io/excludeOutboundPorts": "mysql"}),
     "m.yaml:0: spec.template.metadata.annotations['traffic.sidecar.istio.io/excludeOutboundPorts']: "
     "'mysql' is not a port number (1-65535)"),
    (one_deployment({"traffic.sidecar.istio.io/includeOutboundIPRanges": "10.0.0.0"}),
     "m.yaml:0: spec.template.metadata.annotations['traffic.sidecar.istio.io/includeOutboundIPRanges']: "
     "'10.0.0.0' is not an IP range in CIDR form (e.g. 10.0.0.0/8)"),
    (one_deployment({"sidecar.istio.io/interceptionMode": "TPROXY"}),
     "m.yaml:0: spec.template.metadata.annotations['sidecar.istio.io/interceptionMode']: 'TPROXY': meshproxy "
     "supports REDIRECT (and NONE: no capture), not TPROXY"),
    (one_deployment({"proxy.istio.io/config": "holdApplicationUntilProxyStarts: yes please"}),
     "m.yaml:0: spec.template.metadata.annotations['proxy.istio.io/config'].holdApplicationUntilProxyStarts: "
     "'yes please' is not a boolean"),
    ("kind: Deployment\nmetadata: {name: x}\nspec: {replicas: 1}\n",
     "m.yaml:0: spec.template: a Deployment needs this mapping to inject into"),
    ("kind: Service\n---\nkind: [\n", "m.yaml:1: (document): not valid YAML"),
])
def test_bad_input_is_an_error_naming_file_document_and_field(manifest: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        inject_text(manifest, "m.yaml", InjectOptions())
    assert any(str(p).startswith(message) for p in caught.value.problems), caught.value.problems


def test_the_command_reads_stdin_and_reports_errors(bookinfo: tuple[str, str]) -> None:
    text, out = bookinfo
    result = CliRunner().invoke(main, ["inject", "-f", "-"], input=text)
    assert result.exit_code == 0, result.output
    assert result.output == out
    bad = CliRunner().invoke(main, ["inject", "-f", "-"], input="kind: Pod\nspec: {containers: []}\n")
    assert bad.exit_code == 1
    assert "<stdin>:0: spec.containers: a pod needs at least one container" in bad.output


def test_a_list_of_workloads_is_injected() -> None:
    items = [yaml.safe_load(one_deployment()), {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}}]
    out = yaml.safe_load(inject(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": items})))
    container(pod_template(out["items"][0]), "istio-proxy")
    assert out["items"][1] == items[1]


def test_prometheus_scrape_false_is_left_alone_and_reserved_ports_are_refused() -> None:
    pod = injected_pod(one_deployment({"prometheus.io/scrape": "false", "prometheus.io/port": "8080"}))
    assert {k: v for k, v in pod["metadata"]["annotations"].items() if k.startswith("prometheus.io/")} == {
        "prometheus.io/scrape": "false", "prometheus.io/port": "8080"}
    with pytest.raises(ConfigError) as caught:
        inject_text(one_deployment({"prometheus.io/port": "15090"}), "m.yaml", InjectOptions())
    assert str(caught.value) == ("m.yaml:0: spec.template.metadata.annotations['prometheus.io/port']: port 15090 is "
                                 "reserved for the sidecar (proxy Prometheus (already merged)) and cannot be scraped")


def test_label_values_are_read_as_kubernetes_reads_them_and_written_back_as_they_were() -> None:
    manifest = "kind: Pod\nmetadata:\n  name: p\n  labels: {app: p, version: 2}\nspec: {containers: [{name: a}]}\n"
    pod = yaml.safe_load(inject(manifest))
    assert pod["metadata"]["labels"]["version"] == 2  # not re-typed
    assert pod["metadata"]["labels"]["service.istio.io/canonical-revision"] == "2"
    assert container(pod, "istio-proxy")["args"][-1] == "app=p,version=2,service.istio.io/canonical-name=p," \
                                                       "service.istio.io/canonical-revision=2"
    skipped = "kind: Pod\nmetadata:\n  annotations: {sidecar.istio.io/inject: false}\nspec: {containers: [{name: a}]}\n"
    assert inject(skipped) == skipped


def test_a_metadata_field_of_the_wrong_type_is_an_error() -> None:
    with pytest.raises(ConfigError) as caught:
        inject_text("kind: Pod\nmetadata: {labels: [app]}\nspec: {containers: [{name: a}]}\n", "m.yaml",
                    InjectOptions())
    assert str(caught.value) == "m.yaml:0: metadata.labels: must be a mapping, not list"
