"""What the browser tests share: the demo they look at (Bookinfo, with reviews-test-v2 applied)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from bookinfo_demo import CONFIG, Demo, running_demo
from test_bookinfo_browser import BROWSERS, CHROMIUM


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    if CHROMIUM is None:
        pytest.skip(f"no Chromium found (looked for {', '.join(BROWSERS)}): `apt-get install chromium`")
    with running_demo(tmp_path_factory.mktemp("demo")) as running:
        running.apply(CONFIG / "virtual-service-all-v1.yaml", CONFIG / "virtual-service-reviews-test-v2.yaml")
        yield running
        assert running.interrupt() == 0, running.text
