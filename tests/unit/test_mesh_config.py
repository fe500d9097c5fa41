"""--mesh-config: Istio's MeshConfig YAML, the fields meshproxy acts on, errors naming file and field."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from meshproxy.cli import main
from meshproxy.istio.mesh import MeshConfig, read_mesh_config
from meshproxy.istio.problems import ConfigError


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "mesh.yaml"
    path.write_text(text)
    return str(path)


def test_raw_mesh_config(tmp_path: Path) -> None:
    path = write(tmp_path, "outboundTrafficPolicy: {mode: REGISTRY_ONLY}\nprotocolDetectionTimeout: 100ms\n"
                           "connectTimeout: 2s\naccessLogFile: /dev/stdout\naccessLogEncoding: JSON\n"
                           "defaultConfig: {terminationDrainDuration: 7s, concurrency: 2}\nenableTracing: true\n")
    assert read_mesh_config(path) == MeshConfig("REGISTRY_ONLY", 0.1, 2.0, "/dev/stdout", "json", 7.0)


def test_istio_configmap_and_operator(tmp_path: Path) -> None:
    configmap = write(tmp_path, "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio, namespace: istio-system}\n"
                                "data:\n  mesh: |-\n    outboundTrafficPolicy:\n      mode: ALLOW_ANY\n"
                                "    protocolDetectionTimeout: 0s\n")
    assert read_mesh_config(configmap) == MeshConfig("ALLOW_ANY", 0.0)
    operator = write(tmp_path, "apiVersion: install.istio.io/v1alpha1\nkind: IstioOperator\n"
                               "spec:\n  meshConfig:\n    outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n")
    assert read_mesh_config(operator).outbound_traffic_policy == "REGISTRY_ONLY"
    assert read_mesh_config(write(tmp_path, "")) == MeshConfig()


@pytest.mark.parametrize(("text", "path", "fragment"), [
    ("outboundTrafficPolicy: {mode: ALLOW_ALL}", "outboundTrafficPolicy.mode", "is not one of"),
    ("protocolDetectionTimeout: fast", "protocolDetectionTimeout", "is not a duration"),
    ("connectTimeout: 0s", "connectTimeout", "greater than 0"),
    ("outboundTraficPolicy: {mode: ALLOW_ANY}", "outboundTraficPolicy", "unknown MeshConfig field"),
    ("kind: ConfigMap\ndata: {}", "data.mesh", "no `mesh` key"),
    ("kind: ConfigMap\ndata:\n  mesh: 'accessLogEncoding: XML'", "data.mesh.accessLogEncoding", "is not one of"),
])
def test_errors_name_file_and_field(tmp_path: Path, text: str, path: str, fragment: str) -> None:
    file = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        read_mesh_config(file)
    problem = caught.value.problems[0]
    assert problem.file == file and problem.path == path and fragment in problem.message


def test_run_rejects_a_bad_mesh_config(tmp_path: Path) -> None:
    file = write(tmp_path, "outboundTrafficPolicy: {mode: SOMETIMES}")
    result = CliRunner().invoke(main, ["run", "--mesh-config", file, "--admin", "off", "--listen", "off"])
    assert result.exit_code == 2
    assert "outboundTrafficPolicy.mode" in result.output and "not starting" in result.output
