"""Two meshproxy sidecars with certificates from `meshproxy ca`, as issue #16 checks them: the client's outbound
takes mutual TLS to the server's inbound by auto mTLS (the endpoint runs a sidecar), both report the other's
identity in Istio's metrics, and a server whose certificate names the wrong service account is refused."""

from __future__ import annotations

import http.client
import json
import urllib.request
from pathlib import Path

from harness import ProxyProcess, Upstream, write_config
from tls_peers import make_mesh
from waiting import wait_until

CLIENT_ID = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
SERVER_ID = "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"


def reviews_entry(port: int, sans: list[str] | None = None, account: str = "bookinfo-reviews") -> str:
    spec: dict[str, object] = {
        "hosts": ["reviews.default.svc.cluster.local"], "location": "MESH_INTERNAL", "resolution": "STATIC",
        "ports": [{"number": 9080, "name": "http", "protocol": "HTTP"}],
        "endpoints": [{"address": "127.0.0.1", "ports": {"http": port}, "serviceAccount": account,
                       "labels": {"app": "reviews", "version": "v1", "security.istio.io/tlsMode": "istio"}}],
    }
    if sans is not None:
        spec["subjectAltNames"] = sans
    return "---\n" + json.dumps({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
                                 "metadata": {"name": "reviews", "namespace": "default"}, "spec": spec}) + "\n"


def get(port: int) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    conn.request("GET", "/echo", headers={"Host": "reviews:9080"})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, body


def requests_total(proxy: ProxyProcess) -> list[str]:
    with urllib.request.urlopen(proxy.admin + "/stats/prometheus", timeout=15) as resp:
        return [line for line in resp.read().decode().splitlines() if line.startswith("istio_requests_total{")]


def test_two_sidecars_speak_mutual_tls_and_see_each_others_identity(tmp_path: Path) -> None:
    mesh = make_mesh(tmp_path)
    client_dir = mesh.workload(tmp_path / "productpage", "default", "bookinfo-productpage")
    server_dir = mesh.workload(tmp_path / "reviews", "default", "bookinfo-reviews")
    app = Upstream("reviews-app")
    server = ProxyProcess(args=["--listen", "off", "--inbound", f"127.0.0.1:0=127.0.0.1:{app.port}",
                                "--cert-dir", str(server_dir), "--inbound-tls", "STRICT", "--workload", "reviews-v1",
                                "--label", "app=reviews,version=v1"])
    client = None
    try:
        inbound = server.addresses[f"inbound:{app.port}"][1]
        config = write_config(tmp_path / "config", "mesh.yaml", reviews_entry(inbound))
        client = ProxyProcess(config, args=["--cert-dir", str(client_dir), "--workload", "productpage-v1",
                                            "--label", "app=productpage,version=v1"])
        assert get(client.port)[0] == 200
        assert get(client.port)[0] == 200

        outbound = requests_total(client)
        assert any(f'source_principal="{CLIENT_ID}"' in line and f'destination_principal="{SERVER_ID}"' in line
                   and 'reporter="source"' in line and 'destination_workload="reviews-v1"' in line
                   and line.endswith(" 2.0") for line in outbound), outbound
        inbound_lines = requests_total(server)
        assert any(f'source_principal="{CLIENT_ID}"' in line and f'destination_principal="{SERVER_ID}"' in line
                   and 'connection_security_policy="mutual_tls"' in line and 'source_workload="productpage-v1"'
                   in line and line.endswith(" 2.0") for line in inbound_lines), inbound_lines

        # The ServiceEntry says another service account serves reviews: the client refuses this server (its
        # certificate names bookinfo-reviews), even on the keep-alive connection it already had.
        write_config(tmp_path / "config", "mesh.yaml",
                     reviews_entry(inbound, sans=["spiffe://cluster.local/ns/default/sa/bookinfo-ratings"],
                                   account="bookinfo-ratings"))
        status, body = wait_until(lambda: (answer := get(client.port))[0] == 503 and answer,
                                  what="the reloaded subjectAltNames in force")
        assert body.endswith(b"reset reason: remote connection failure")
        refused = wait_until(lambda: [e for e in client.access_entries(1) if e["response_code"] == 503],
                             what="the refused request's access log line")[0]
        assert refused["response_flags"] == "UF,URX" and refused["response_code_details"].endswith(
            f"verify_cert_failed:_SAN_matcher,_certificate_SANs_are_[{SERVER_ID}]:TLS_error_end}}")
        served = len(app.requests)
        assert get(client.port)[0] == 503 and len(app.requests) == served
    finally:
        if client is not None:
            client.stop()
        server.stop()
        app.close()
