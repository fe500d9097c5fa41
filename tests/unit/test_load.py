"""The Istio YAML loader: every document Istio would reject is refused, naming the file, document and field.

Tables of (YAML text -> expected field path + message fragment); the YAML is
written the way people write it, flow style where it keeps a case on one line.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from meshproxy.istio import model as m
from meshproxy.istio.load import load, load_text
from meshproxy.istio.read import MAX_FILE_BYTES
from meshproxy.istio.problems import ConfigError, Problem
from meshproxy.routing.compile import Identity, compile_table

# --------------------------------------------------------------------------- builders


def vs(route: str, *, hosts: str = "[ratings]", extra: str = "") -> str:
    """A VirtualService for `hosts` whose one HTTP route is `route` (YAML lines of spec.http[0])."""
    body = textwrap.indent(textwrap.dedent(route).strip(), "    ").lstrip()
    extra = textwrap.indent(textwrap.dedent(extra).strip(), "  ") + "\n" if extra else ""
    return (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: ratings\n"
        f"spec:\n  hosts: {hosts}\n{extra}  http:\n  - {body}\n"
    )


def dr(subsets: str, *, host: str = "reviews", name: str = "reviews") -> str:
    """A DestinationRule with `subsets` (YAML list lines)."""
    body = textwrap.indent(textwrap.dedent(subsets).strip(), "  ")
    return (
        f"apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: {name}\n"
        f"spec:\n  host: {host}\n  subsets:\n{body}\n"
    )


def se(spec: str) -> str:
    """A ServiceEntry for a.example.com with `spec` (YAML lines after hosts)."""
    body = textwrap.indent(textwrap.dedent(spec).strip(), "  ")
    return (
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: a\n"
        f"spec:\n  hosts: [a.example.com]\n{body}\n"
    )


def meta(metadata: str, *, api_version: str = "networking.istio.io/v1") -> str:
    """A valid DestinationRule spec under the given metadata (YAML lines)."""
    body = textwrap.indent(textwrap.dedent(metadata).strip(), "  ")
    return f"apiVersion: {api_version}\nkind: DestinationRule\nmetadata:\n{body}\nspec:\n  host: reviews\n"


TO_RATINGS = "route: [{destination: {host: ratings}}]"


def run(text: str, file: str = "f.yaml") -> tuple[list, list[Problem]]:
    problems: list[Problem] = []
    resources = load_text(text, file, problems)
    return resources, problems


def errors_of(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity == "error"]


def warnings_of(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity == "warning"]


# --------------------------------------------------------------------------- bad documents

BILLION_LAUGHS = "".join(
    f"{name}: &{name} [{', '.join([f'*{prev}' if prev else 'lol'] * 10)}]\n"
    for prev, name in zip(["", "a", "b", "c", "d", "e", "f", "g", "h"], "abcdefghi")
)

# (id, YAML text, field path of the one error, fragment of its message)
BAD_DOCUMENTS = [
    # ---- tcp: and tls: routes, ServiceEntry addresses (Istio's validateTCPRoute / validateTLSRoute)
    ("tcp-bad-subnet", vs(TO_RATINGS, extra="tcp: [{match: [{destinationSubnets: [10.0.0/8]}], "
                                            "route: [{destination: {host: ratings}}]}]"),
     "spec.tcp[0].match[0].destinationSubnets[0]", "is not an IP address or CIDR block"),
    ("tcp-no-route", vs(TO_RATINGS, extra="tcp: [{match: [{port: 80}]}]"), "spec.tcp[0].route", "route is required"),
    ("tls-no-sni", vs(TO_RATINGS, extra="tls: [{match: [{port: 443}], route: [{destination: {host: ratings}}]}]"),
     "spec.tls[0].match[0].sniHosts", "at least one SNI host"),
    ("tls-sni-outside-hosts", vs(TO_RATINGS, hosts="['*.example.com']",
                                 extra="tls: [{match: [{sniHosts: [a.example.org]}], route: [{destination: {host: x}}]}]"),
     "spec.tls[0].match[0].sniHosts[0]", "SNI host 'a.example.org' is not a compatible subset of any of the virtual "
                                         "service hosts: [*.example.com]"),
    ("tls-no-match", vs(TO_RATINGS, extra="tls: [{route: [{destination: {host: ratings}}]}]"),
     "spec.tls[0].match", "at least one match condition"),
    ("se-bad-address", se("addresses: [10.0.0.300]\nports: [{number: 80, name: tcp, protocol: TCP}]"),
     "spec.addresses[0]", "is not an IP address or CIDR block"),
    # ---- schema: unknown fields, wrong types
    ("unknown-field-hint", vs(f"{TO_RATINGS}\ntimout: 1s"),
     "spec.http[0].timout", "unknown field 'timout' (did you mean 'timeout'?)"),
    ("unknown-field-deep", vs("fault: {delay: {fixdDelay: 7s, percentage: {value: 10}}}\n" + TO_RATINGS),
     "spec.http[0].fault.delay.fixdDelay", "did you mean 'fixedDelay'?"),
    ("unknown-top-level", meta("name: reviews") + "specs: {}\n", "specs", "unknown field 'specs'"),
    ("unknown-metadata-field", meta("name: reviews\ncolour: blue"), "metadata.colour", "unknown field 'colour'"),
    ("string-where-int", vs("route: [{destination: {host: ratings}, weight: '50'}]"),
     "spec.http[0].route[0].weight", "expected int32, got string '50'"),
    ("list-where-mapping", vs("route: [{destination: [ratings]}]"),
     "spec.http[0].route[0].destination", "expected a mapping (Destination), got list"),
    ("mapping-where-list", vs(TO_RATINGS, hosts="{ratings: 1}"), "spec.hosts", "expected a list, got mapping"),
    ("bool-where-string", vs("route: [{destination: {host: ratings, subset: yes}}]"),
     "spec.http[0].route[0].destination.subset", "expected string, got boolean True (quote it)"),
    ("unquoted-number-label", dr("- {name: v1, labels: {version: 1}}"),
     "spec.subsets[0].labels.version", "expected string, got integer 1 (quote it)"),
    ("int-out-of-range", vs("route: [{destination: {host: ratings, port: {number: -1}}}]"),
     "spec.http[0].route[0].destination.port.number", "out of range for uint32"),
    ("bad-enum", se("ports: [{number: 80, name: http}]\nresolution: ROUND_ROBIN"),
     "spec.resolution", "'ROUND_ROBIN' is not one of"),
    ("oneof-exact-and-prefix", vs("match: [{uri: {exact: /a, prefix: /a}}]\n" + TO_RATINGS),
     "spec.http[0].match[0].uri", "only one of exact, prefix, regex may be set"),
    # ---- StringMatch values (Istio validateStringMatch / validateStringRegexp)
    ("regex-lookahead", vs("match: [{uri: {regex: '(?=a)'}}]\n" + TO_RATINGS),
     "spec.http[0].match[0].uri.regex", "not a valid RE2 regex"),
    ("regex-lookbehind", vs("match: [{headers: {x-a: {regex: '(?<=a)b'}}}]\n" + TO_RATINGS),
     "spec.http[0].match[0].headers.x-a.regex", "not a valid RE2 regex"),
    ("regex-backreference", vs(r"match: [{uri: {regex: '(a)\1'}}]" + "\n" + TO_RATINGS),
     "spec.http[0].match[0].uri.regex", "invalid escape sequence"),
    ("regex-empty", vs("match: [{uri: {regex: ''}}]\n" + TO_RATINGS),
     "spec.http[0].match[0].uri.regex", "regex must not be empty"),
    ("regex-too-long", vs(f"match: [{{uri: {{regex: '{'a' * 1025}'}}}}]\n" + TO_RATINGS),
     "spec.http[0].match[0].uri.regex", "longer than 1024 characters"),
    ("prefix-empty", vs("match: [{uri: {prefix: ''}}]\n" + TO_RATINGS),
     "spec.http[0].match[0].uri.prefix", "empty prefix is invalid"),
    ("query-regex-bad", vs("match: [{queryParams: {q: {regex: 'a{1001}'}}}]\n" + TO_RATINGS),
     "spec.http[0].match[0].queryParams.q.regex", "invalid repetition size"),
    # ---- destinations and weights (validateHTTPRouteDestinations)
    ("weights-sum-zero",
     vs("route:\n- {destination: {host: ratings, subset: v1}, weight: 0}\n- {destination: {host: ratings, subset: v2}, weight: 0}"),
     "spec.http[0].route", "total destination weight must be greater than 0"),
    ("weight-negative",
     vs("route:\n- {destination: {host: ratings, subset: v1}, weight: -10}\n- {destination: {host: ratings, subset: v2}, weight: 110}"),
     "spec.http[0].route[0].weight", "weight must not be negative"),
    ("destination-host-missing", vs("route: [{destination: {subset: v1}}]"),
     "spec.http[0].route[0].destination.host", "destination host is required"),
    ("destination-host-star", vs("route: [{destination: {host: '*'}}]"),
     "spec.http[0].route[0].destination.host", "invalid destination host *"),
    ("destination-host-bad", vs("route: [{destination: {host: 'rat ings'}}]"),
     "spec.http[0].route[0].destination.host", "is not a valid host name"),
    # ---- route kinds (validateHTTPRoute)
    ("route-and-redirect", vs(f"{TO_RATINGS}\nredirect: {{uri: /v2}}"),
     "spec.http[0]", "cannot contain both route and redirect"),
    ("route-and-direct-response", vs(f"{TO_RATINGS}\ndirectResponse: {{status: 503}}"),
     "spec.http[0]", "directResponse together with route or redirect"),
    ("no-route-redirect-or-direct-response", vs("name: nothing"),
     "spec.http[0]", "HTTP route, redirect or direct response is required"),
    ("redirect-and-rewrite", vs("redirect: {uri: /v2}\nrewrite: {uri: /v3}"),
     "spec.http[0]", "cannot contain both rewrite and redirect"),
    ("hosts-empty", vs(TO_RATINGS, hosts="[]"), "spec.hosts", "at least one host is required"),
    ("host-star-for-mesh", vs(TO_RATINGS, hosts="['*']"),
     "spec.hosts[0]", "wildcard host * is not allowed for virtual services bound to the mesh gateway"),
    ("host-star-mesh-and-gateway", vs(TO_RATINGS, hosts="['*']", extra="gateways: [gw, mesh]"),
     "spec.hosts[0]", "bound to the mesh gateway"),
    ("host-wildcard-inside", vs(TO_RATINGS, hosts="['ra*ings.example.com']"),
     "spec.hosts[0]", "a wildcard must be a whole leading label"),
    # ---- fault injection (validateHTTPFaultInjection)
    ("abort-status-700", vs("fault: {abort: {httpStatus: 700, percentage: {value: 10}}}\n" + TO_RATINGS),
     "spec.http[0].fault.abort.httpStatus", "not in range 200-599"),
    ("abort-status-199", vs("fault: {abort: {httpStatus: 199, percentage: {value: 10}}}\n" + TO_RATINGS),
     "spec.http[0].fault.abort.httpStatus", "not in range 200-599"),
    ("abort-percentage-over-100", vs("fault: {abort: {httpStatus: 500, percentage: {value: 100.5}}}\n" + TO_RATINGS),
     "spec.http[0].fault.abort.percentage.value", "not a percentage between 0 and 100"),
    ("delay-without-fixed-delay", vs("fault: {delay: {percentage: {value: 10}}}\n" + TO_RATINGS),
     "spec.http[0].fault.delay.fixedDelay", "fixedDelay is required"),
    ("delay-exponential", vs("fault: {delay: {exponentialDelay: 1s, percentage: {value: 10}}}\n" + TO_RATINGS),
     "spec.http[0].fault.delay.exponentialDelay", "not supported"),
    ("fault-empty", vs("fault: {}\n" + TO_RATINGS), "spec.http[0].fault", "fault must have a delay or an abort"),
    # ---- durations (agent.ValidateDuration: >= 1ms, ms precision; proto JSON needs a unit)
    ("duration-no-unit", vs(f"{TO_RATINGS}\ntimeout: '7'"), "spec.http[0].timeout", "'7' is not a duration"),
    ("duration-bare-int", vs(f"{TO_RATINGS}\ntimeout: 7"), "spec.http[0].timeout", "7 is not a duration"),
    ("duration-negative", vs(f"{TO_RATINGS}\ntimeout: -1s"), "spec.http[0].timeout", "is not a duration"),
    ("duration-below-1ms", vs(f"{TO_RATINGS}\ntimeout: 0.5ms"), "spec.http[0].timeout", "duration must be at least 1ms"),
    ("duration-sub-ms-precision", vs(f"{TO_RATINGS}\ntimeout: 1.0005s"),
     "spec.http[0].timeout", "only durations to ms precision"),
    ("fixed-delay-below-1ms", vs("fault: {delay: {fixedDelay: 100us, percentage: {value: 1}}}\n" + TO_RATINGS),
     "spec.http[0].fault.delay.fixedDelay", "at least 1ms"),
    # ---- retries (validateHTTPRetry)
    ("retries-negative-attempts", vs(f"{TO_RATINGS}\nretries: {{attempts: -1}}"),
     "spec.http[0].retries.attempts", "attempts cannot be negative"),
    ("retries-unknown-retry-on", vs(f"{TO_RATINGS}\nretries: {{attempts: 2, retryOn: '5xx,bogus'}}"),
     "spec.http[0].retries.retryOn", "'bogus' is not a valid retryOn policy"),
    ("retries-status-code-out-of-range", vs(f"{TO_RATINGS}\nretries: {{attempts: 2, retryOn: '5xx,999'}}"),
     "spec.http[0].retries.retryOn", "999 is not an HTTP status code"),
    ("retries-zero-with-per-try-timeout", vs(f"{TO_RATINGS}\nretries: {{attempts: 0, perTryTimeout: 2s}}"),
     "spec.http[0].retries", "configured when attempts are set to 0"),
    ("retries-zero-with-retry-on", vs(f"{TO_RATINGS}\nretries: {{attempts: 0, retryOn: 5xx}}"),
     "spec.http[0].retries", "configured when attempts are set to 0"),
    ("retries-zero-with-remote-localities", vs(f"{TO_RATINGS}\nretries: {{attempts: 0, retryRemoteLocalities: false}}"),
     "spec.http[0].retries", "configured when attempts are set to 0"),
    ("retries-per-try-timeout-no-unit", vs(f"{TO_RATINGS}\nretries: {{attempts: 2, perTryTimeout: '2'}}"),
     "spec.http[0].retries.perTryTimeout", "is not a duration"),
    # ---- direct response and redirect
    ("direct-response-status-100", vs("directResponse: {status: 100}"),
     "spec.http[0].directResponse.status", "must be in range 200-599"),
    ("direct-response-status-missing", vs("directResponse: {body: {string: hi}}"),
     "spec.http[0].directResponse.status", "must be in range 200-599"),
    ("direct-response-bad-base64", vs("directResponse: {status: 200, body: {bytes: '!!!'}}"),
     "spec.http[0].directResponse.body.bytes", "not valid base64"),
    ("redirect-code-200", vs("redirect: {uri: /v2, redirectCode: 200}"),
     "spec.http[0].redirect.redirectCode", "200 is not a redirect code"),
    ("redirect-nothing-to-change", vs("redirect: {redirectCode: 302}"),
     "spec.http[0].redirect", "redirect must specify"),
    ("mirror-percentage-over-100",
     vs(f"{TO_RATINGS}\nmirror: {{host: ratings-shadow}}\nmirrorPercentage: {{value: 101}}"),
     "spec.http[0]", "mirror percentage 101.0 is not between 0 and 100"),
    # ---- DestinationRule
    ("dr-duplicate-subset-names", dr("- {name: v1, labels: {version: v1}}\n- {name: v1, labels: {version: v2}}"),
     "spec.subsets[1].name", "duplicate subset name 'v1'"),
    ("dr-subset-without-name", dr("- {labels: {version: v1}}"), "spec.subsets[0].name", "subset name is required"),
    ("dr-host-missing", dr("- {name: v1}", host="''"), "spec.host", "host is required"),
    # ---- ServiceEntry
    ("se-static-hostname-endpoint",
     se("ports: [{number: 80, name: http, protocol: HTTP}]\nresolution: STATIC\nendpoints: [{address: b.example.com}]"),
     "spec.endpoints[0].address", "'b.example.com' is not an IP address (required for STATIC resolution)"),
    ("se-endpoint-port-name-undefined",
     se("ports: [{number: 80, name: http, protocol: HTTP}]\nresolution: STATIC\n"
        "endpoints: [{address: 10.0.0.1, ports: {grpc: 8080}}]"),
     "spec.endpoints[0].ports.grpc", "endpoint port 'grpc' is not defined by the service entry"),
    ("se-duplicate-port-numbers",
     se("ports: [{number: 80, name: http, protocol: HTTP}, {number: 80, name: http-alt, protocol: HTTP}]\nresolution: DNS"),
     "spec.ports[1].number", "port number 80 is used twice"),
    ("se-duplicate-port-names",
     se("ports: [{number: 80, name: http, protocol: HTTP}, {number: 81, name: http, protocol: HTTP}]\nresolution: DNS"),
     "spec.ports[1].name", "port name 'http' is used twice"),
    ("se-port-zero", se("ports: [{number: 0, name: http, protocol: HTTP}]\nresolution: DNS"),
     "spec.ports[0].number", "0 is not a valid port"),
    ("se-endpoint-without-address",
     se("ports: [{number: 80, name: http}]\nresolution: STATIC\nendpoints: [{labels: {version: v1}}]"),
     "spec.endpoints[0].address", "endpoint address is required"),
    # ---- the Kubernetes envelope
    ("metadata-name-missing", meta("namespace: default"), "metadata.name", "not a valid resource name"),
    ("metadata-name-upper-case", meta("name: Reviews"), "metadata.name", "'Reviews' is not a valid resource name"),
    ("metadata-name-underscore", meta("name: reviews_v1"), "metadata.name", "not a valid resource name"),
    ("metadata-namespace-invalid", meta("name: reviews\nnamespace: My_NS"), "metadata.namespace", "not a valid namespace"),
    ("metadata-missing", "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nspec: {host: reviews}\n",
     "metadata", "is required and must be a mapping"),
    ("spec-missing", "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews}\n",
     "spec", "is required and must be a mapping"),
    ("api-version-v2", meta("name: reviews", api_version="networking.istio.io/v2"),
     "apiVersion", "networking.istio.io/v2 is not served"),
    ("kind-missing", "apiVersion: networking.istio.io/v1\nmetadata: {name: a}\n", "kind", "not a Kubernetes resource"),
    ("api-version-missing", "kind: VirtualService\nmetadata: {name: a}\n", "apiVersion", "not a Kubernetes resource"),
    # ---- the YAML itself
    ("document-is-a-list", "- apiVersion: networking.istio.io/v1\n- kind: VirtualService\n",
     "", "a document must be a mapping, got list"),
    ("document-is-a-string", "just some text\n", "", "a document must be a mapping, got string"),
    ("invalid-yaml-line-number", meta("name: reviews") + "  subsets: []\n   trafficPolicy: {}\n",
     "", "invalid YAML at line 8"),
    ("invalid-yaml-tab", "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n\tname: a\n",
     "", "invalid YAML at line 4"),
    ("unterminated-quote", meta("name: reviews") + "  subsets: 'oops\n", "", "invalid YAML"),
    ("duplicate-key", meta("name: reviews") + "  host: ratings\n", "", "duplicate key 'host' at line 7"),
    ("duplicate-key-nested", vs(TO_RATINGS, extra="gateways: [mesh]\ngateways: [gw]"), "", "duplicate key 'gateways'"),
    ("alias-bomb", BILLION_LAUGHS, "", "expands to more than"),
    ("alias-cycle", "a: &a [*a]\n", "", "expands to more than"),
    ("python-object-tag", "!!python/object:os.system {}\n", "", "could not determine a constructor"),
    ("python-apply-tag-in-spec",
     "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: a}\n"
     "spec:\n  host: !!python/object/apply:os.getcwd []\n",
     "", "could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.getcwd'"),
]


@pytest.mark.parametrize(("text", "path", "fragment"), [c[1:] for c in BAD_DOCUMENTS], ids=[c[0] for c in BAD_DOCUMENTS])
def test_bad_document_is_refused_with_its_field_path(text, path, fragment):
    resources, problems = run(text)
    errors = errors_of(problems)
    assert resources == []
    assert [(p.file, p.doc, p.path) for p in errors] == [("f.yaml", 0, path)], [str(p) for p in problems]
    assert fragment in errors[0].message


@pytest.mark.parametrize(("text", "path", "fragment"), [c[1:] for c in BAD_DOCUMENTS], ids=[c[0] for c in BAD_DOCUMENTS])
def test_bad_document_fails_load_with_config_error(tmp_path, text, path, fragment):
    file = tmp_path / "bad.yaml"
    file.write_text(text)
    with pytest.raises(ConfigError) as info:
        load([file])
    errors = errors_of(info.value.problems)
    assert [(p.file, p.path) for p in errors] == [(str(file), path)]
    assert fragment in str(info.value)


def test_the_billion_laughs_document_is_never_constructed():
    # The node graph is counted (aliases expanded) before anything is built.
    _, problems = run(BILLION_LAUGHS + "---\n" + BILLION_LAUGHS)
    assert [(p.doc, p.message) for p in problems] == [(0, "document expands to more than 200000 nodes"),
                                                       (1, "document expands to more than 200000 nodes")]


def test_python_tags_are_never_executed(tmp_path):
    marker = tmp_path / "created"
    text = f"!!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path ['{marker}']]\n"
    _, problems = run(text)
    assert len(problems) == 1 and "could not determine a constructor" in problems[0].message
    assert not marker.exists()


def test_invalid_yaml_in_a_later_document_names_that_document():
    text = meta("name: a") + "---\n" + meta("name: b") + "  - x\n"
    resources, problems = run(text)
    assert [r.meta.name for r in resources] == ["a"]
    assert [(p.doc, p.path) for p in problems] == [(1, "")]
    assert "invalid YAML at line 14" in problems[0].message


def test_a_file_over_one_mib_is_refused_unread(tmp_path):
    big = tmp_path / "big.yaml"
    padding = "# " + "x" * 100 + "\n"
    big.write_text(meta("name: reviews") + padding * (MAX_FILE_BYTES // len(padding) + 1))
    assert big.stat().st_size > MAX_FILE_BYTES
    with pytest.raises(ConfigError) as info:
        load([big])
    assert [(p.file, p.doc, p.path) for p in info.value.problems] == [(str(big), 0, "")]
    assert "larger than 1048576 bytes" in info.value.problems[0].message


def test_a_file_that_is_not_utf8_is_refused(tmp_path):
    file = tmp_path / "latin1.yaml"
    file.write_bytes(meta("name: reviews").encode() + b"# caf\xe9\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load([file])


# --------------------------------------------------------------------------- good documents

# (id, YAML text, check of the one resource, warnings' field paths)
GOOD_DOCUMENTS = [
    ("weights-need-not-sum-to-100",  # Istio >= 1.15: only the sum > 0 is required
     vs("route:\n- {destination: {host: ratings, subset: v1}, weight: 3}\n- {destination: {host: ratings, subset: v2}, weight: 1}"),
     lambda r: [d.weight for d in r.http[0].route] == [3, 1], []),
    ("one-destination-weight-zero", vs("route: [{destination: {host: ratings}, weight: 0}]"),
     lambda r: r.http[0].route[0].weight == 0, []),
    ("zero-weight-beside-positive",
     vs("route:\n- {destination: {host: ratings, subset: v1}, weight: 0}\n- {destination: {host: ratings, subset: v2}, weight: 100}"),
     lambda r: [d.weight for d in r.http[0].route] == [0, 100], []),
    ("abort-status-600", vs("fault: {abort: {httpStatus: 600, percentage: {value: 1}}}\n" + TO_RATINGS),
     lambda r: r.http[0].fault.abort.http_status == 600, []),
    ("direct-response-status-600", vs("directResponse: {status: 600}"),  # Istio validateHTTPStatus: 200..600
     lambda r: r.http[0].direct_response.status == 600, []),
    ("direct-response-body", vs("directResponse: {status: 503, body: {string: down}}"),
     lambda r: r.http[0].direct_response == m.HTTPDirectResponse(503, b"down"), []),
    ("direct-response-bytes", vs("directResponse: {status: 200, body: {bytes: aGk=}}"),
     lambda r: r.http[0].direct_response.body == b"hi", []),
    ("redirect-code-default", vs("redirect: {uri: /v2}"), lambda r: r.http[0].redirect.redirect_code == 301, []),
    ("redirect-code-zero-is-unset", vs("redirect: {uri: /v2, redirectCode: 0}"),  # proto3: 0 = unset
     lambda r: r.http[0].redirect.redirect_code == 301, []),
    ("redirect-code-308", vs("redirect: {authority: b.example.com, redirectCode: 308}"),
     lambda r: r.http[0].redirect.redirect_code == 308, []),
    ("retries-zero-alone", vs(f"{TO_RATINGS}\nretries: {{attempts: 0}}"),
     lambda r: r.http[0].retries.attempts == 0, []),
    ("retry-on-status-codes", vs(f"{TO_RATINGS}\nretries: {{attempts: 3, retryOn: 'gateway-error,503,connect-failure'}}"),
     lambda r: r.http[0].retries.retry_on == "gateway-error,503,connect-failure", []),
    ("durations-go-style", vs(f"{TO_RATINGS}\ntimeout: 1m30s\nretries: {{attempts: 1, perTryTimeout: 250ms}}"),
     lambda r: (r.http[0].timeout, r.http[0].retries.per_try_timeout) == (90.0, 0.25), []),
    ("timeout-zero-means-none", vs(f"{TO_RATINGS}\ntimeout: 0s"),
     lambda r: r.http[0].timeout is None, ["spec.http[0].timeout"]),
    ("header-regex-star-is-presence", vs("match: [{headers: {x-user: {regex: '*'}}}]\n" + TO_RATINGS),
     lambda r: r.http[0].match[0].headers == (("x-user", m.StringMatch("present")),), []),
    ("header-empty-match-is-presence", vs("match: [{headers: {X-User: {}}}]\n" + TO_RATINGS),
     lambda r: r.http[0].match[0].headers == (("x-user", m.StringMatch("present")),), []),
    ("regex-case-insensitive-flag", vs("match: [{uri: {regex: '(?i)/API/.*'}}]\n" + TO_RATINGS),
     lambda r: r.http[0].match[0].uri == m.StringMatch("regex", "(?i)/API/.*"), []),
    ("regex-exactly-1024", vs(f"match: [{{uri: {{regex: '{'a' * 1024}'}}}}]\n" + TO_RATINGS),
     lambda r: len(r.http[0].match[0].uri.value) == 1024, []),
    ("host-star-on-gateway-only", vs(TO_RATINGS, hosts="['*']", extra="gateways: [bookinfo-gateway]"),
     lambda r: r.hosts == ("*",) and r.gateways == ("bookinfo-gateway",), []),
    ("wildcard-host", vs("route: [{destination: {host: '*.example.com'}}]", hosts="['*.example.com']"),
     lambda r: r.hosts == ("*.example.com",), []),
    ("gateways-default-to-mesh", vs(TO_RATINGS), lambda r: r.gateways == ("mesh",), []),
    ("hosts-lower-cased", vs(TO_RATINGS, hosts="[Ratings.Example.COM]"),
     lambda r: r.hosts == ("ratings.example.com",), []),
    ("v1alpha3-is-served",
     vs(TO_RATINGS).replace("networking.istio.io/v1\n", "networking.istio.io/v1alpha3\n"),
     lambda r: r.meta.kind == "VirtualService", []),
    ("v1beta1-is-served",
     vs(TO_RATINGS).replace("networking.istio.io/v1\n", "networking.istio.io/v1beta1\n"),
     lambda r: r.meta.kind == "VirtualService", []),
    ("delay-percent-deprecated", vs("fault: {delay: {fixedDelay: 2s, percent: 50}}\n" + TO_RATINGS),
     lambda r: r.http[0].fault.delay == m.Delay(2.0, 50.0), ["spec.http[0].fault.delay.percent"]),
    ("delay-without-percentage-never-fires", vs("fault: {delay: {fixedDelay: 2s}}\n" + TO_RATINGS),
     lambda r: r.http[0].fault.delay == m.Delay(2.0, 0.0), []),
    ("mirror-percentage-default-100", vs(f"{TO_RATINGS}\nmirror: {{host: ratings-shadow}}"),
     lambda r: r.http[0].mirrors == (m.HTTPMirrorPolicy(m.Destination("ratings-shadow"), 100.0),), []),
    ("tcp-routes-load", vs(TO_RATINGS, extra="tcp: [{match: [{port: 27017, destinationSubnets: [10.0.0.0/8]}], "
                                             "route: [{destination: {host: ratings}}]}]"),
     lambda r: len(r.http) == 1 and r.tcp == (m.L4Route(
         (m.L4MatchAttributes(destination_subnets=("10.0.0.0/8",), port=27017),),
         (m.HTTPRouteDestination(m.Destination("ratings")),)),), []),
    ("tls-routes-load", vs(TO_RATINGS, hosts="[ratings, '*.example.com']",
                           extra="tls: [{match: [{sniHosts: [A.example.com, '*.b.example.com']}], "
                                 "route: [{destination: {host: ratings}, weight: 100}]}]"),
     lambda r: r.tls[0].match[0].sni_hosts == ("a.example.com", "*.b.example.com")
     and r.tls[0].route[0].weight == 100, []),
    ("header-name-underscore-warns", vs("match: [{headers: {end_user: {exact: jason}}}]\n" + TO_RATINGS),
     lambda r: r.http[0].match[0].headers[0][0] == "end_user", ["spec.http[0].match[0].headers.end_user"]),
    ("dr-quoted-label", dr("- {name: v1, labels: {version: '1'}}"),
     lambda r: r.subsets == (m.Subset("v1", {"version": "1"}),), []),
    ("se-static-ipv6-and-unix",
     se("ports: [{number: 80, name: http, protocol: HTTP}]\nresolution: STATIC\n"
        "endpoints: [{address: '2001:db8::1'}, {address: 'unix:///var/run/a.sock'}]"),
     lambda r: [e.address for e in r.endpoints] == ["2001:db8::1", "unix:///var/run/a.sock"], []),
    ("se-dns-hostname-endpoint",
     se("ports: [{number: 80, name: http, protocol: HTTP}]\nresolution: DNS\nendpoints: [{address: b.example.com}]"),
     lambda r: r.resolution == "DNS" and r.endpoints[0].address == "b.example.com", []),
    ("se-lower-case-protocol",  # the Istio 1.0 egress sample writes `protocol: http`
     se("ports: [{number: 443, name: https, protocol: http}]"),
     lambda r: r.ports == (m.ServicePort(443, "HTTP", "https"),) and r.resolution == "NONE", []),
    ("se-resolution-as-number", se("ports: [{number: 80, name: http}]\nresolution: 2"),
     lambda r: r.resolution == "DNS", []),
]


@pytest.mark.parametrize(("text", "check", "warning_paths"), [c[1:] for c in GOOD_DOCUMENTS],
                         ids=[c[0] for c in GOOD_DOCUMENTS])
def test_good_document_loads(text, check, warning_paths):
    resources, problems = run(text)
    assert errors_of(problems) == [], [str(p) for p in problems]
    assert [p.path for p in warnings_of(problems)] == warning_paths
    assert len(resources) == 1
    assert check(resources[0])


def test_problem_text_is_file_doc_path_message():
    assert str(Problem("a.yaml", 2, "spec.hosts", "bad")) == "a.yaml:2: spec.hosts: bad"
    assert str(Problem("a.yaml", 0, "spec", "odd", "warning")) == "a.yaml:0: spec: warning: odd"
    assert str(Problem("a.yaml", 1, "", "not YAML")) == "a.yaml:1: (document): not YAML"


# --------------------------------------------------------------------------- every problem, not only the first


def test_every_error_in_a_file_is_reported(tmp_path):
    text = "---\n".join([
        # doc 0: two schema errors
        vs("route: [{destination: {host: ratings}, weight: '50'}]\ntimout: 1s"),
        # doc 1: valid
        dr("- {name: v1, labels: {version: v1}}"),
        # doc 2: two value errors in two routes of one VirtualService
        vs("route:\n- {destination: {host: ratings, subset: v1}, weight: -1}\n- {destination: {host: ratings, subset: v2}, weight: 2}")
        + "  - fault: {abort: {httpStatus: 700, percentage: {value: 1}}}\n    route: [{destination: {host: ratings}}]\n",
        # doc 3: metadata and spec errors together
        meta("name: Bad_Name") + "  colour: blue\n",
    ])
    file = tmp_path / "many.yaml"
    file.write_text(text)
    with pytest.raises(ConfigError) as info:
        load([file])
    assert [(p.doc, p.path) for p in errors_of(info.value.problems)] == [
        (0, "spec.http[0].route[0].weight"),
        (0, "spec.http[0].timout"),
        (2, "spec.http[0].route[0].weight"),
        (2, "spec.http[1].fault.abort.httpStatus"),
        (3, "metadata.name"),
        (3, "spec.colour"),
    ]
    # The exception text is every problem, one per line.
    assert str(info.value).splitlines() == [str(p) for p in info.value.problems]


def test_errors_in_several_files_are_all_reported(tmp_path):
    (tmp_path / "a.yaml").write_text(meta("name: A"))
    (tmp_path / "b.yaml").write_text(vs("name: nothing"))
    (tmp_path / "c.yaml").write_text(dr("- {name: v1}"))
    with pytest.raises(ConfigError) as info:
        load([tmp_path])
    assert [(Path(p.file).name, p.path) for p in info.value.problems] == [
        ("a.yaml", "metadata.name"), ("b.yaml", "spec.http[0]")]


# --------------------------------------------------------------------------- what is accepted as-is

KUBECTL_GET_YAML = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: |
      {"apiVersion":"networking.istio.io/v1","kind":"DestinationRule","metadata":{"name":"reviews"}}
  creationTimestamp: "2024-08-01T10:00:00Z"
  generation: 2
  labels:
    app: reviews
  managedFields:
  - apiVersion: networking.istio.io/v1
    fieldsType: FieldsV1
    fieldsV1:
      f:spec:
        f:host: {}
    manager: kubectl-client-side-apply
    operation: Update
    time: "2024-08-01T10:00:00Z"
  name: reviews
  namespace: default
  resourceVersion: "123456"
  uid: 6a0e4c8e-1b0b-4c5c-9a2f-1b2c3d4e5f60
spec:
  host: reviews
  subsets:
  - labels:
      version: v1
    name: v1
status:
  observedGeneration: 2
  validationMessages:
  - documentationUrl: https://istio.io/latest/docs/reference/config/analysis/ist0101/
    level: ERROR
    type:
      code: IST0101
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  creationTimestamp: 2024-08-01T10:00:00Z
  name: reviews
  namespace: default
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews, subset: v1}}]
status: {}
"""


def test_kubectl_get_output_with_server_fields_and_status_loads():
    resources, problems = run(KUBECTL_GET_YAML)
    assert problems == []
    assert [(r.meta.kind, r.meta.name, r.meta.namespace) for r in resources] == [
        ("DestinationRule", "reviews", "default"), ("VirtualService", "reviews", "default")]
    assert resources[0].subsets == (m.Subset("v1", {"version": "v1"}),)


def test_kubectl_list_kind_is_skipped_not_rejected():
    # `kubectl get -o yaml` of several objects is a v1 List; it is not an Istio resource.
    resources, problems = run("apiVersion: v1\nkind: List\nitems: []\nmetadata: {resourceVersion: ''}\n")
    assert (resources, problems) == ([], [])


OTHER_KINDS = [
    ("deployment", "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: Not_Valid}\nspec: {replicas: many}\n"),
    ("service", "apiVersion: v1\nkind: Service\nmetadata: {name: reviews}\nspec: {ports: [{port: 9080}]}\n"),
    ("service-account", "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: bookinfo-reviews}\n"),
    ("other-istio-group", "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: d}\nspec: {}\n"),
    ("istio-kind-meshproxy-ignores", "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: d}\nspec: {}\n"),
    ("empty-documents", "---\n---\n# only a comment\n---\n"),
]


@pytest.mark.parametrize("text", [t for _, t in OTHER_KINDS], ids=[i for i, _ in OTHER_KINDS])
def test_documents_of_other_kinds_are_skipped_silently(text):
    assert run(text) == ([], [])


def test_workload_entry_is_read_and_ignored_with_a_warning():
    resources, problems = run(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: vm}\nspec: {address: 10.0.0.9}\n")
    assert resources == []
    assert [(p.severity, p.path) for p in problems] == [("warning", "kind")]


def test_multi_document_file_with_other_kinds_keeps_document_indexes():
    text = ("apiVersion: v1\nkind: Service\nmetadata: {name: reviews}\n---\n"
            + dr("- {name: v1, labels: {version: v1}}") + "---\n" + meta("name: Bad"))
    resources, problems = run(text)
    assert [r.meta.origin for r in resources] == [m.Origin("f.yaml", 1)]
    assert [(p.doc, p.path) for p in problems] == [(2, "metadata.name")]


# --------------------------------------------------------------------------- identity across files


def test_same_kind_namespace_name_twice_later_wins_with_a_warning(tmp_path):
    first = tmp_path / "a.yaml"
    second = tmp_path / "b.yaml"
    first.write_text(dr("- {name: v1, labels: {version: v1}}"))
    second.write_text(meta("name: other") + "---\n" + dr("- {name: v2, labels: {version: v2}}"))
    result = load([tmp_path])
    rules = result.snapshot.destination_rules
    assert sorted(r.meta.name for r in rules) == ["other", "reviews"]
    reviews = next(r for r in rules if r.meta.name == "reviews")
    assert reviews.meta.origin == m.Origin(str(second), 1)
    assert [s.name for s in reviews.subsets] == ["v2"]
    assert [(p.file, p.doc, p.path, p.severity) for p in result.warnings] == [(str(second), 1, "metadata.name", "warning")]
    assert result.warnings[0].message == f"replaces DestinationRule default/reviews from {first}:0"


def test_same_name_in_another_namespace_or_kind_is_another_resource():
    text = (dr("- {name: v1}") + "---\n"
            + dr("- {name: v1}").replace("name: reviews\n", "name: reviews\n  namespace: test\n", 1) + "---\n"
            + vs("route: [{destination: {host: reviews}}]", hosts="[reviews]").replace("name: ratings", "name: reviews"))
    resources, problems = run(text)
    assert problems == []
    assert sorted(r.meta.key for r in resources) == [
        ("DestinationRule", "default", "reviews"), ("DestinationRule", "test", "reviews"),
        ("VirtualService", "default", "reviews")]


def test_folders_are_read_recursively_in_sorted_order_skipping_hidden(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "rules.yml").write_text(dr("- {name: v1}", name="b"))
    (tmp_path / "a.json").write_text(
        '{"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",'
        ' "metadata": {"name": "a"}, "spec": {"host": "a"}}')
    (tmp_path / "notes.txt").write_text("not config: {")
    (tmp_path / "..data").mkdir()  # Kubernetes ConfigMap mount internals
    (tmp_path / "..data" / "x.yaml").write_text(meta("name: Hidden"))
    (tmp_path / ".c.yaml.tmp").write_text("{")
    result = load([tmp_path])
    assert [r.meta.name for r in result.snapshot.destination_rules] == ["a", "b"]
    assert result.snapshot.files == (str(tmp_path / "a.json"), str(tmp_path / "b" / "rules.yml"))


# --------------------------------------------------------------------------- short host names


def test_short_host_expands_in_the_namespace_of_the_rule(tmp_path):
    (tmp_path / "reviews.yaml").write_text(
        vs("route: [{destination: {host: reviews, subset: v2}}]", hosts="[reviews]")
        .replace("name: ratings\n", "name: reviews\n  namespace: test\n")
        + "---\n"
        + dr("- {name: v2, labels: {version: v2}}").replace("name: reviews\n", "name: reviews\n  namespace: test\n")
        + "---\n"
        + se("ports: [{number: 9080, name: http, protocol: HTTP}]\nresolution: STATIC\n"
             "endpoints: [{address: 10.0.0.2, labels: {version: v2}}]")
        .replace("[a.example.com]", "[reviews.test.svc.cluster.local]").replace("name: a\n", "name: reviews\n  namespace: test\n")
    )
    snapshot = load([tmp_path]).snapshot
    assert snapshot.virtual_services[0].hosts == ("reviews",)  # as written; the compiler expands

    table, warnings = compile_table(snapshot, Identity(namespace="test"))
    assert warnings == []
    vhost, port = table.virtual_host(b"reviews.test.svc.cluster.local")
    assert vhost is not None and port == 80
    assert vhost.name == "reviews.test.svc.cluster.local"
    assert [r.virtual_service for r in vhost.routes] == ["test/reviews"]
    dest = vhost.routes[0].picker.choices[0]
    assert (dest.host, dest.subset) == ("reviews.test.svc.cluster.local", "v2")
    assert [e.address for e in dest.cluster.endpoints] == ["10.0.0.2"]
    for alias in (b"reviews", b"reviews.test", b"reviews.test.svc", b"reviews.test.svc.cluster.local:9080"):
        assert table.virtual_host(alias)[0] is vhost, alias
    assert table.virtual_host(b"reviews.default.svc.cluster.local")[0] is None

    # A proxy in another namespace reaches it by its longer names only.
    other, _ = compile_table(snapshot, Identity(namespace="default"))
    assert other.virtual_host(b"reviews")[0] is None
    assert other.virtual_host(b"reviews.test")[0].name == "reviews.test.svc.cluster.local"


def test_short_destination_host_without_a_service_names_the_expanded_host():
    resources, problems = run(vs("route: [{destination: {host: reviews}}]", hosts="[reviews]")
                              .replace("name: ratings\n", "name: reviews\n  namespace: test\n"))
    assert problems == []
    snapshot = m.Snapshot(virtual_services=tuple(resources))
    _, warnings = compile_table(snapshot, Identity(namespace="test"))
    assert [(w.path, w.severity) for w in warnings] == [("spec.http[0].route[0].destination.host", "warning")]
    assert "'reviews.test.svc.cluster.local' not found" in warnings[0].message


def test_a_file_removed_from_a_folder_while_loading_is_skipped(tmp_path, monkeypatch) -> None:
    import meshproxy.istio.load as loader

    folder = tmp_path / "config"
    folder.mkdir()
    (folder / "gone.yaml").write_text("kind: Nothing\n")
    listed = loader.config_files([folder])
    (folder / "gone.yaml").unlink()  # a `demo delete` or ConfigMap update between listing and reading
    monkeypatch.setattr(loader, "config_files", lambda paths: listed)
    assert loader.load([folder]).snapshot.files == (str(folder / "gone.yaml"),)
    with pytest.raises(loader.ConfigError, match="cannot read"):
        loader.load([folder / "gone.yaml"])  # a file named on the command line must exist
