"""Config from a mounted ConfigMap: the folder as the kubelet's atomic writer makes it, swapped as it swaps it.

The kubelet writes a ConfigMap volume as `..2026_12_06_11_00_00.000000001/` (the files), `..data -> ..2026_...`
and one link per key, `vs.yaml -> ..data/vs.yaml`; an update writes a new timestamped folder, points a
`..data_tmp` link at it, renames that over `..data` (the one atomic step) and removes the old folder. The proxy
must reload without a restart, read each file once (not again under `..data` or the timestamped folder), reject a
bad update with its place (file, document, field) and keep the running config."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import urllib.request
from pathlib import Path

from harness import ProxyProcess, Upstream, service_entry, virtual_service
from waiting import wait_until


class ConfigMapVolume:
    """A ConfigMap volume written as Kubernetes' AtomicWriter writes one (pkg/volume/util/atomic_writer.go)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True)
        self.generation = 0

    def write(self, files: dict[str, str]) -> None:
        self.generation += 1
        stamp = f"..2026_12_06_11_00_{self.generation:02d}.{self.generation:09d}"
        folder = self.root / stamp
        folder.mkdir()
        for name, text in files.items():
            (folder / name).write_text(text)
        data = self.root / "..data"
        old = os.readlink(data) if data.is_symlink() else None
        tmp = self.root / "..data_tmp"
        os.symlink(stamp, tmp)
        os.replace(tmp, data)  # the swap
        for name in files:
            link = self.root / name
            if not link.is_symlink():
                os.symlink(f"..data/{name}", link)
        if old is not None:
            shutil.rmtree(self.root / old)


def routed_to(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/echo", headers={"Host": "backend"})
    response = conn.getresponse()
    response.read()
    conn.close()
    return response.getheader("x-upstream") or ""


def config_dump(proxy: ProxyProcess) -> dict[str, object]:
    with urllib.request.urlopen(proxy.admin + "/config_dump", timeout=10) as response:
        return json.loads(response.read())


def test_a_configmap_swap_reloads_and_a_bad_one_is_rejected(tmp_path: Path) -> None:
    a, b = Upstream("a"), Upstream("b")
    services = service_entry("a", [(a.port, {})], port=80) + service_entry("b", [(b.port, {})], port=80) + \
        service_entry("backend", [(a.port, {})], port=80)
    volume = ConfigMapVolume(tmp_path / "meshproxy-config")
    volume.write({"services.yaml": services, "routes.yaml": virtual_service("backend", destination="a")})
    proxy = ProxyProcess(volume.root)  # polls every 0.2 s
    try:
        assert routed_to(proxy.port) == "a"
        files = config_dump(proxy)["files"]
        assert sorted(Path(str(f)).name for f in files) == ["routes.yaml", "services.yaml"]  # each read once
        assert not any(".." in Path(str(f)).parent.name for f in files)

        volume.write({"services.yaml": services, "routes.yaml": virtual_service("backend", destination="b")})
        wait_until(lambda: routed_to(proxy.port) == "b", what="the swapped route")
        assert "config version 2 loaded (files changed)" in proxy.log

        bad = virtual_service("backend", destination="a").replace("http:", "htp:")
        volume.write({"services.yaml": services, "routes.yaml": bad})
        wait_until(lambda: "config rejected" in proxy.log, what="the rejection")
        assert "routes.yaml:0: spec.htp: unknown field 'htp'" in proxy.log  # file, document, field
        assert routed_to(proxy.port) == "b"  # the running config stays
        assert config_dump(proxy)["version"] == 2

        volume.write({"services.yaml": services, "routes.yaml": virtual_service("backend", destination="a")})
        wait_until(lambda: routed_to(proxy.port) == "a", what="the good update after the bad one")
        assert config_dump(proxy)["version"] == 3
    finally:
        assert proxy.stop() == 0
        a.close()
        b.close()
