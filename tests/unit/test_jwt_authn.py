"""RequestAuthentication with real signed tokens (keys made here): Envoy's answers for each way a token fails, the
token locations, and what goes upstream."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest

from meshproxy.istio.load import load_text, snapshot_of
from meshproxy.security.jwt_authn import JwksCache, JwtAuthenticator, compile_jwt_authn
from meshproxy.security.scope import Workload

from jwt_keys import ISSUER, SigningKey, jwks

KEY = SigningKey("k1")
OTHER = SigningKey("k1")  # same kid, other key: a forged signature
EC_KEY = SigningKey("e1", "EC")
WORKLOAD = Workload("foo", {"app": "httpbin"})


def authenticator(rule: str, namespace: str = "foo") -> JwtAuthenticator:
    text = (f"apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: r, namespace: {namespace}}}\n"
            f"spec:\n  jwtRules:\n  - {rule}\n")
    problems: list[Any] = []
    snapshot = snapshot_of(load_text(text, "r.yaml", problems))
    assert [p for p in problems if p.severity == "error"] == []
    found = compile_jwt_authn(snapshot.request_authentications, WORKLOAD, JwksCache())
    assert found is not None
    return found


INLINE = f"issuer: {ISSUER}\n    jwks: '{jwks(KEY, EC_KEY)}'"


def bearer(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", b"Bearer " + token.encode())]


NOW = int(time.time())  # the tokens' times and the authenticator's clock (a slow run must not age them)


@pytest.mark.parametrize(("name", "token", "status", "message"), [
    ("expired", KEY.token(exp=NOW - 600), 401, "Jwt is expired"),
    ("within the 60 s clock skew", KEY.token(exp=NOW - 10), 0, ""),
    ("not yet valid", KEY.token(nbf=NOW + 600), 401, "Jwt not yet valid"),
    ("wrong issuer", KEY.token(iss="https://evil.example"), 401, "Jwt issuer is not configured"),
    ("bad signature", OTHER.token(), 401, "Jwt verification fails"),
    ("unknown kid", SigningKey("k9").token(), 401, "Jwks doesn't have key to match kid or alg from Jwt"),
    ("alg none", "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0." + base64.urlsafe_b64encode(
        json.dumps({"iss": ISSUER, "sub": "x"}).encode()).decode().rstrip("=") + ".", 401,
     "Jwt header [alg] is not supported"),
    ("HS256 with no such key", __import__("jwt").encode({"iss": ISSUER, "sub": "x"}, "secret" * 6, algorithm="HS256",
                                                        headers={"kid": "k1"}), 401,
     "Jwks doesn't have key to match kid or alg from Jwt"),
    ("not a JWT", "abc.def", 401, "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"),
    ("valid RS256", KEY.token(), 0, ""),
    ("valid ES256", EC_KEY.token(), 0, ""),
])
def test_token_outcomes(name: str, token: str, status: int, message: str):
    checker = authenticator(INLINE)
    checker.now = lambda: float(NOW)
    result = checker.authenticate(bearer(token), b"")
    if status == 0:
        assert result.failure is None and result.principal == f"{ISSUER}/alice"
    else:
        assert result.failure is not None
        assert (result.failure.status, result.failure.message) == (status, message)
        assert result.failure.details == "jwt_authn_access_denied{" + message.replace(" ", "_") + "}"


def test_no_token_passes_unauthenticated():
    result = authenticator(INLINE).authenticate([(b"x-other", b"1")], b"")
    assert result.failure is None and result.claims is None


@pytest.mark.parametrize(("audiences", "aud", "status"), [
    ("[bookstore]", "bookstore", 0),
    ("[bookstore]", ["x", "bookstore"], 0),
    ("[bookstore]", "other", 403),  # Envoy: JwtAudienceNotAllowed is Forbidden
    ("[bookstore]", None, 403),
    ("[]", "anything", 0),
])
def test_audiences(audiences: str, aud: Any, status: int):
    auth = authenticator(f"{INLINE}\n    audiences: {audiences}")
    result = auth.authenticate(bearer(KEY.token(aud=aud)), b"")
    assert (result.failure.status if result.failure else 0) == status


def test_default_locations_are_bearer_and_access_token():
    auth = authenticator(INLINE)
    token = KEY.token()
    assert auth.authenticate([(b"authorization", b"bearer " + token.encode())], b"").claims is not None
    assert auth.authenticate([], b"a=1&access_token=" + token.encode()).claims is not None
    assert auth.authenticate([(b"authorization", b"Basic " + token.encode())], b"").claims is None


def test_from_headers_with_prefix_and_from_params_replace_the_defaults():
    auth = authenticator(f"{INLINE}\n    fromHeaders: [{{name: x-jwt, prefix: 'Token '}}]\n    fromParams: [jwt]")
    token = KEY.token()
    assert auth.authenticate([(b"x-jwt", b"Token " + token.encode())], b"").claims is not None
    assert auth.authenticate([], b"jwt=" + token.encode()).claims is not None
    assert auth.authenticate(bearer(token), b"").claims is None  # Authorization is no longer read
    assert auth.authenticate([(b"x-jwt", token.encode())], b"").claims is None  # prefix required


def test_from_cookies():
    auth = authenticator(f"{INLINE}\n    fromCookies: [session]")
    assert auth.authenticate([(b"cookie", b"a=b; session=" + KEY.token().encode())], b"").claims is not None


def test_token_header_removed_unless_forwarded_and_outputs_set():
    token = KEY.token(groups=["dev"], admin=True)
    auth = authenticator(f"{INLINE}\n    outputPayloadToHeader: x-jwt-payload\n"
                         f"    outputClaimToHeaders: [{{header: x-sub, claim: sub}}, {{header: x-admin, claim: admin}}]")
    result = auth.authenticate(bearer(token), b"")
    assert result.remove == {b"authorization", b"x-jwt-payload", b"x-sub", b"x-admin"}
    added = dict(result.add)
    assert json.loads(base64.urlsafe_b64decode(added[b"x-jwt-payload"] + b"==")) ["sub"] == "alice"
    assert added[b"x-sub"] == b"alice" and added[b"x-admin"] == b"true"
    forwarded = authenticator(f"{INLINE}\n    forwardOriginalToken: true").authenticate(bearer(token), b"")
    assert forwarded.remove == frozenset()


def test_remote_jwks_not_fetched_yet_asks_to_wait_then_fails_when_the_fetch_failed():
    auth = authenticator(f"issuer: {ISSUER}\n    jwksUri: http://127.0.0.1:1/jwks")
    remote = auth.providers[0].remote
    assert remote is not None
    assert auth.authenticate(bearer(KEY.token()), b"").waiting_for is remote
    remote.fetched_at, remote.error = time.monotonic(), "connection refused"
    result = auth.authenticate(bearer(KEY.token()), b"")
    assert result.failure is not None and result.failure.message == "Jwks remote fetch is failed"


@pytest.mark.parametrize(("rule", "path", "message"), [
    ("{jwksUri: 'ftp://x/keys'}", "spec.jwtRules[0].jwksUri", "URI scheme 'ftp' is not supported"),
    ("{issuer: x, jwks: 'not json'}", "spec.jwtRules[0].jwks", "jwks parse error"),
    ("{issuer: x, jwks: '" + jwks(KEY) + "', audiences: ['']}", "spec.jwtRules[0].audiences[0]", "audience must be non-empty"),
    ("{issuer: x, jwks: '" + jwks(KEY) + "', fromHeaders: [{prefix: a}]}", "spec.jwtRules[0].fromHeaders[0].name", "must be non-empty"),
    ("{issuer: x, jwks: '" + jwks(KEY) + "', outputClaimToHeaders: [{header: 'bad header', claim: sub}]}",
     "spec.jwtRules[0].outputClaimToHeaders[0].header", "not a valid HTTP header name"),
    ("{issuer: x, jwks: '" + jwks(KEY) + "', fromHeader: [{name: a}]}", "spec.jwtRules[0].fromHeader", "unknown field"),
])
def test_invalid_request_authentication_names_the_field(rule: str, path: str, message: str):
    text = f"apiVersion: security.istio.io/v1beta1\nkind: RequestAuthentication\nmetadata: {{name: r}}\nspec:\n  jwtRules:\n  - {rule}\n"
    problems: list[Any] = []
    load_text(text, "r.yaml", problems)
    errors = [p for p in problems if p.severity == "error"]
    assert [p.path for p in errors] == [path]
    assert message in errors[0].message


def head(method: str, headers: list[tuple[bytes, bytes]]) -> Any:
    from meshproxy.messages import RequestHead

    return RequestHead(method.encode(), b"/x", b"/x", b"", b"httpbin", headers, b"1.1", True, None, False, False,
                       frozenset())


def test_request_policy_checks_tokens_but_lets_a_cors_preflight_through_as_istio():
    from meshproxy.security.policy import compile_workload_policy

    text = (f"apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: r, namespace: foo}}\n"
            f"spec:\n  jwtRules:\n  - {INLINE}\n")
    problems: list[Any] = []
    snapshot = snapshot_of(load_text(text, "r.yaml", problems))
    policy = compile_workload_policy(snapshot, WORKLOAD, JwksCache()).bind(8000, True)
    forged = bearer(OTHER.token())
    verdict = policy.check(head("GET", forged), b"10.0.0.1")
    assert verdict is not None and verdict.status == 401
    preflight = forged + [(b"origin", b"https://app"), (b"access-control-request-method", b"POST")]
    assert policy.check(head("OPTIONS", preflight), b"10.0.0.1") is None
    good = head("GET", bearer(KEY.token()) + [(b"x-keep", b"1")])
    assert policy.check(good, b"10.0.0.1") is None
    assert good.headers == [(b"x-keep", b"1")]  # the token's header does not go upstream


def test_the_jwks_cache_is_shared_across_loads_and_forgets_uris_no_longer_named():
    cache = JwksCache()
    first = cache.remote("http://a/jwks", 5.0)
    assert cache.remote("http://a/jwks", 5.0) is first  # a reload naming it again reuses its keys
    other = cache.remote("http://b/jwks", 5.0)
    cache.retain([other])
    assert list(cache.remotes) == ["http://b/jwks"]


def test_key_choice_by_kid_key_type_and_the_jwks_own_alg():
    bare = {k: v for k, v in KEY.public_jwk.items() if k not in ("alg", "kid")}  # a JWK with neither alg nor kid
    auth = authenticator(f"issuer: {ISSUER}\n    jwks: '{json.dumps({'keys': [EC_KEY.public_jwk, bare]})}'")
    import jwt as pyjwt

    rs384 = pyjwt.encode({"iss": ISSUER, "sub": "alice"}, KEY.private, algorithm="RS384")  # no kid in the token
    assert auth.authenticate(bearer(rs384), b"").claims is not None  # the RSA key without alg fits RS384
    pinned = authenticator(f"issuer: {ISSUER}\n    jwks: '{jwks(KEY)}'")  # this JWK says alg RS256
    result = pinned.authenticate(bearer(pyjwt.encode({"iss": ISSUER, "sub": "a"}, KEY.private, algorithm="RS384",
                                                     headers={"kid": "k1"})), b"")
    assert result.failure is not None and result.failure.message == "Jwks doesn't have key to match kid or alg from Jwt"
