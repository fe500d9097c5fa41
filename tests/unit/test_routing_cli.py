"""`meshproxy route URL` explains a routing decision; `meshproxy routes` prints the compiled table."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from meshproxy.cli import main
from meshproxy.demo.topology import services_yaml

from harness import SAMPLES

CANARY = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
  annotations: {meshproxy.io/sticky-header: end-user}
spec:
  hosts: [reviews]
  http:
  - name: jason
    match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - name: api
    match: [{uri: {prefix: /api}, method: {exact: POST}}]
    route: [{destination: {host: reviews, subset: v3}}]
  - name: split
    match: [{uri: {prefix: /reviews}}]
    route:
    - {destination: {host: reviews, subset: v1}, weight: 90}
    - {destination: {host: reviews, subset: v2}, weight: 10}
"""

REVIEWS_DR = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
"""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    (tmp_path / "services.yaml").write_text(services_yaml())
    (tmp_path / "dr.yaml").write_text(REVIEWS_DR)
    (tmp_path / "vs.yaml").write_text(CANARY)
    return tmp_path


def route(*args: str) -> tuple[int, list[str]]:
    result = CliRunner().invoke(main, ["route", *args])
    return result.exit_code, result.output.splitlines()


def test_chosen_route_with_destination_subset_cluster_and_endpoints(config):
    code, lines = route("--config", str(config), "-H", "end-user: jason", "http://reviews:9080/reviews/0")
    assert code == 0, lines
    assert lines[0] == "request: GET /reviews/0  (authority 'reviews:9080', 1 header line(s))"
    assert lines[1].startswith("virtual host: reviews.default.svc.cluster.local  [")
    assert lines[2:4] == ["  route 0: default/reviews http[0] 'jason'  header end-user exact 'jason'", "    yes"]
    assert lines[4] == "chosen: VirtualService default/reviews, http[0], route name 'jason'"
    assert lines[5].startswith("  -> reviews.default.svc.cluster.local subset v2  all requests (one destination)  "
                               "cluster outbound|9080|v2|reviews.default.svc.cluster.local  endpoints 127.0.0.1:")


def test_earlier_routes_say_why_not(config):
    code, lines = route("--config", str(config), "-X", "get", "http://reviews:9080/reviews/0?x=1")
    assert code == 0
    assert "    no: header end-user is missing, wanted exact 'jason'" in lines
    assert "    no: uri '/reviews/0' is not prefix '/api'" in lines
    text = "\n".join(lines)
    assert "chosen: VirtualService default/reviews, http[2], route name 'split'" in text
    assert "subset v1  weight 90/100 (90%)" in text and "subset v2  weight 10/100 (10%)" in text
    assert "sticky on header end-user: not in this request, the pick is random" in text


def test_method_condition_reason(config):
    code, lines = route("--config", str(config), "http://reviews:9080/api/x")
    assert code == 1
    assert "    no: method GET is not exact 'POST'" in lines
    assert lines[-1] == "no route matched: 404 NR"
    code, lines = route("--config", str(config), "-X", "POST", "http://reviews:9080/api/x")
    assert code == 0 and "route name 'api'" in "\n".join(lines)


def test_sticky_user_is_shown_with_the_destination_it_always_gets(config):
    code, lines = route("--config", str(config), "-H", "end-user: alice", "http://reviews:9080/reviews/1")
    assert code == 0
    assert any(line.startswith("  -> sticky on header end-user: 'alice' always goes to reviews.default.svc.cluster.local subset v")
               for line in lines), lines


def test_unknown_host_is_404_nr(config):
    code, lines = route("--config", str(config), "http://nowhere:9080/")
    assert code == 1
    assert lines[-1] == "virtual host: none for authority 'nowhere:9080': 404 NR"


def test_url_without_scheme_and_bad_header(config):
    code, lines = route("--config", str(config), "reviews:9080/reviews/0")
    assert code == 0
    code, _ = route("--config", str(config), "-H", "no-colon", "http://reviews/")
    assert code == 2


def test_source_labels_from_the_command_line(tmp_path):
    (tmp_path / "services.yaml").write_text(services_yaml())
    (tmp_path / "dr.yaml").write_text(REVIEWS_DR)
    (tmp_path / "vs.yaml").write_text(CANARY.replace("match: [{headers: {end-user: {exact: jason}}}]",
                                                     "match: [{sourceLabels: {app: productpage}}]"))
    _, lines = route("--config", str(tmp_path), "http://reviews:9080/")
    assert "route name 'jason'" not in "\n".join(lines)
    code, lines = route("--config", str(tmp_path), "--label", "app=productpage", "http://reviews:9080/")
    assert code == 0 and "route name 'jason'" in "\n".join(lines)


def test_bookinfo_walkthrough_from_the_command_line(tmp_path):
    (tmp_path / "services.yaml").write_text(services_yaml())
    args = ["--config", str(tmp_path / "services.yaml"), "--config", str(SAMPLES / "destination-rule-all.yaml"),
            "--config", str(SAMPLES / "virtual-service-reviews-test-v2.yaml")]
    _, lines = route(*args, "-H", "end-user: jason", "http://reviews:9080/reviews/0")
    assert any("subset v2" in line for line in lines if line.startswith("  -> "))
    _, lines = route(*args, "http://reviews:9080/reviews/0")
    assert any("subset v1" in line for line in lines if line.startswith("  -> "))


def test_routes_prints_the_compiled_table(config):
    result = CliRunner().invoke(main, ["routes", "--config", str(config)])
    assert result.exit_code == 0
    assert "  split (default/reviews#2)  uri prefix '/reviews'  ->  outbound|9080|v1|reviews.default.svc.cluster.local 90%" \
        in result.output
    assert "[sticky header end-user]" in result.output
