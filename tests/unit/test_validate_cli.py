"""`meshproxy validate PATH...`: every problem one per line as `file:doc: path: message`, exit 1 on any error."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from meshproxy.cli import main

from harness import ISTIO_CORPUS, ISTIO_CURRENT, SAMPLES

REVIEWS_SE = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews}
spec:
  hosts: [reviews.default.svc.cluster.local]
  ports: [{number: 9080, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints:
  - {address: 10.0.0.1, labels: {version: v1}}
  - {address: 10.0.0.2, labels: {version: v2}}
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
"""

REVIEWS_VS = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - route:
    - {destination: {host: reviews, subset: v1}, weight: 80}
    - {destination: {host: reviews, subset: v2}, weight: 20}
"""

INVALID = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews}, weight: '100'}]
    timout: 3s
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: 1}}
"""

# Accepted by Istio, but will not work as written: cross-reference warnings only.
WARNINGS_ONLY = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings}
spec:
  hosts: [ratings]
  http:
  - route: [{destination: {host: ratings, subset: v1}}]
  - match: [{uri: {prefix: /never}}]
    route: [{destination: {host: ratings}}]
"""

SUMMARY_RE = re.compile(
    r"valid: (\d+) file\(s\), (\d+) VirtualService, (\d+) DestinationRule, (\d+) ServiceEntry, (\d+) Gateway; (\d+) warning\(s\)"
)


def validate(*args: str | Path):
    return CliRunner().invoke(main, ["validate", *map(str, args)])


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def test_valid_folder_prints_one_summary_line_and_exits_0(tmp_path):
    write(tmp_path, "se.yaml", REVIEWS_SE)
    write(tmp_path, "rules.yaml", REVIEWS_DR + "---\n" + REVIEWS_VS)
    result = validate(tmp_path)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "valid: 2 file(s), 1 VirtualService, 1 DestinationRule, 1 ServiceEntry, 0 Gateway; 0 warning(s)"]


def test_invalid_file_prints_every_error_and_exits_1(tmp_path):
    path = write(tmp_path, "bad.yaml", INVALID)
    result = validate(path)
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        f"{path}:0: spec.http[0].route[0].weight: expected int32, got string '100'",
        f"{path}:0: spec.http[0].timout: unknown field 'timout' (did you mean 'timeout'?)",
        f"{path}:1: spec.subsets[0].labels.version: expected string, got integer 1 (quote it)",
        "invalid: 3 error(s), 0 warning(s)",
    ]


def test_errors_and_warnings_together_are_all_printed_and_counted(tmp_path):
    good = write(tmp_path, "a.yaml", REVIEWS_DR)
    again = write(tmp_path, "b.yaml", REVIEWS_DR + "---\n" + "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
                  "metadata: {name: r}\nspec:\n  hosts: [r]\n  http:\n  - directResponse: {status: 100}\n")
    result = validate(tmp_path)
    assert result.exit_code == 1
    *problems, summary = result.output.splitlines()
    assert sorted(problems) == [
        f"{again}:0: metadata.name: warning: replaces DestinationRule default/reviews from {good}:0",
        f"{again}:1: spec.http[0].directResponse.status: status 100 must be in range 200-599",
    ]
    assert summary == "invalid: 1 error(s), 1 warning(s)"


def test_warnings_only_exit_0_and_print_each_warning(tmp_path):
    path = write(tmp_path, "ratings.yaml", WARNINGS_ONLY)
    result = validate(path)
    assert result.exit_code == 0, result.output
    *warnings, summary = result.output.splitlines()
    assert warnings == [
        f"{path}:0: spec.http[0].route[0].destination.host: warning: referenced host "
        "'ratings.default.svc.cluster.local' not found (no ServiceEntry): requests get 503 NC",
        f"{path}:0: spec.http[1].route[0].destination.host: warning: referenced host "
        "'ratings.default.svc.cluster.local' not found (no ServiceEntry): requests get 503 NC",
        f"{path}:0: spec.http[1]: warning: never matches: spec.http[0] before it matches every request",
    ]
    assert summary == "valid: 1 file(s), 1 VirtualService, 0 DestinationRule, 0 ServiceEntry, 0 Gateway; 3 warning(s)"


def test_loader_warnings_are_printed_too(tmp_path):
    path = write(tmp_path, "old.yaml", REVIEWS_SE + "---\n" + REVIEWS_DR + "---\n"
                 + REVIEWS_VS.replace("route: [{destination: {host: reviews, subset: v2}}]",
                                      "fault: {delay: {fixedDelay: 7s, percent: 100}}\n"
                                      "    route: [{destination: {host: reviews, subset: v2}}]"))
    result = validate(path)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[:-1] == [
        f"{path}:2: spec.http[0].fault.delay.percent: warning: deprecated: use percentage"]
    assert result.output.splitlines()[-1].endswith("; 1 warning(s)")


def test_namespace_option_sets_the_proxy_namespace(tmp_path):
    vs = REVIEWS_VS.replace("metadata: {name: reviews}", "metadata: {name: reviews, namespace: test}")
    write(tmp_path, "vs.yaml", vs)
    write(tmp_path, "se.yaml", REVIEWS_SE.replace("reviews.default.svc", "reviews.test.svc"))
    write(tmp_path, "dr.yaml", REVIEWS_DR.replace("metadata: {name: reviews}", "metadata: {name: reviews, namespace: test}"))
    for namespace in ("default", "test"):
        result = CliRunner().invoke(main, ["validate", "--namespace", namespace, str(tmp_path)])
        assert result.exit_code == 0, result.output
        assert result.output.splitlines() == [
            "valid: 3 file(s), 1 VirtualService, 1 DestinationRule, 1 ServiceEntry, 0 Gateway; 0 warning(s)"]


@pytest.mark.parametrize(("args", "fragment"), [
    ([], "Missing argument"),
    (["/nonexistent/meshproxy/config.yaml"], "does not exist"),
])
def test_usage_errors_exit_2(args, fragment):
    result = CliRunner().invoke(main, ["validate", *args])
    assert result.exit_code == 2
    assert fragment in result.output


def test_every_output_line_has_the_problem_format(tmp_path):
    write(tmp_path, "bad.yaml", INVALID)
    write(tmp_path, "warn.yaml", WARNINGS_ONLY.replace("name: ratings}", "name: ratings2}"))
    lines = validate(tmp_path).output.splitlines()
    line_re = re.compile(r"^(?P<file>.+\.yaml):(?P<doc>\d+): (?P<path>\S+): (?P<rest>.+)$")
    assert all(line_re.match(line) for line in lines[:-1]), lines
    assert re.fullmatch(r"invalid: \d+ error\(s\), \d+ warning\(s\)", lines[-1])


def test_istio_samples_folder_is_valid_when_swagger_is_left_out():
    files = [str(p) for p in ISTIO_CURRENT]
    result = validate(*files)
    assert result.exit_code == 0, result.output
    summary = result.output.splitlines()[-1]
    assert SUMMARY_RE.fullmatch(summary)
    assert summary.startswith("valid: 23 file(s), 7 VirtualService, 5 DestinationRule, 1 ServiceEntry, 2 Gateway;")


def test_istio_samples_folder_with_swagger_is_invalid():
    result = validate(ISTIO_CORPUS / "swagger.yaml", SAMPLES / "virtual-service-all-v1.yaml")
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        f"{ISTIO_CORPUS / 'swagger.yaml'}:0: apiVersion: not a Kubernetes resource: apiVersion and kind must be set",
        "invalid: 1 error(s), 0 warning(s)",
    ]


def test_python_dash_m_entry_point(tmp_path):
    """The real process: stdout lines and exit status, as a user or CI job sees them."""
    bad = write(tmp_path, "bad.yaml", INVALID)
    proc = subprocess.run([sys.executable, "-m", "meshproxy", "validate", str(bad)],
                          capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 1
    assert proc.stdout.splitlines()[-1] == "invalid: 3 error(s), 0 warning(s)"
    assert proc.stderr == ""


@pytest.mark.timeout(30)  # a value wrongly accepted would start the proxy
@pytest.mark.parametrize(("value", "message"), [("999", "999 is not an HTTP status code"),
                                                ("5xx,bogus", "'bogus' is not a valid retryOn policy")])
def test_default_retry_on_is_checked_as_retry_on_in_yaml(value: str, message: str) -> None:
    result = CliRunner().invoke(main, ["run", "--listen", "127.0.0.1:0", "--default-retry-on", value])
    assert result.exit_code == 2 and message in result.output, result.output  # rejected before anything starts
