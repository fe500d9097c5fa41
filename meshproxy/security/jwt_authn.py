"""RequestAuthentication: JWT validation as Istio configures Envoy's jwt_authn filter, with PyJWT.

Pure: the keys of a `jwksUri` are held in a `RemoteJwks` that `jwks_fetch.py` fills (and refreshes) off the data
path; `compile_jwt_authn` runs at load, `authenticate` per request.

Istio's semantics (one provider per jwtRule of every RequestAuthentication selecting the workload, required as
"any of them, or none"):
- no token in any configured location: the request passes unauthenticated (authorization decides; a policy with
  `requestPrincipals: ["*"]` then refuses it);
- a token that fails: 401 with Envoy's status text as the body (`Jwt verification fails`, `Jwt is expired`,
  `Jwt issuer is not configured`...), `www-authenticate: Bearer realm="<uri>", error="invalid_token"`, details
  `jwt_authn_access_denied{<text with underscores>}`; an audience not allowed is 403, as in Envoy;
- a valid token: its payload becomes `request.auth.*` (principal `iss/sub`); the header it came in is removed
  before the request goes upstream unless `forwardOriginalToken` (a query parameter stays, as in Envoy);
  `outputPayloadToHeader` carries the base64url payload and `outputClaimToHeaders` single claims.
Locations: `fromHeaders` (name, prefix), `fromParams`, `fromCookies`; with none of them, Envoy's defaults:
`Authorization: Bearer <token>` and the `access_token` query parameter. Clock skew: 60 s (Envoy's default).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qsl

from ..istio import model as m
from .scope import Workload, selects

if TYPE_CHECKING:  # PyJWT imports cryptography (8 MiB resident): imported where a key or a token is met
    import jwt

CLOCK_SKEW: Final = 60.0  # seconds, Envoy's clock_skew_seconds default
DEFAULT_HEADER: Final = m.JWTHeader("authorization", "Bearer ")
DEFAULT_PARAM: Final = "access_token"

# Envoy's jwt_verify_lib status texts (the 401 body and, spaces as underscores, the details).
BAD_FORMAT: Final = "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
UNKNOWN_ISSUER: Final = "Jwt issuer is not configured"
EXPIRED: Final = "Jwt is expired"
NOT_YET_VALID: Final = "Jwt not yet valid"
AUDIENCE_NOT_ALLOWED: Final = "Audiences in Jwt are not allowed"
VERIFICATION_FAILS: Final = "Jwt verification fails"
KID_ALG_MISMATCH: Final = "Jwks doesn't have key to match kid or alg from Jwt"
JWKS_FETCH_FAILED: Final = "Jwks remote fetch is failed"
BAD_ALG: Final = "Jwt header [alg] field is required and must be a string"
ALG_NOT_SUPPORTED: Final = "Jwt header [alg] is not supported"
BAD_KID: Final = "Jwt header [kid] field is not a string"
ISS_NOT_STRING: Final = "Jwt payload [iss] field is not a string"
# jwt_verify_lib's algorithms ("none" is never one of them)
SUPPORTED_ALGS: Final = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
                                   "HS256", "HS384", "HS512", "EdDSA"})
DETAILS_PREFIX: Final = "jwt_authn_access_denied"


class RemoteJwks:
    """The keys at a jwksUri, shared by every compiled snapshot that names it (a reload does not refetch)."""

    __slots__ = ("uri", "timeout", "discover", "keys", "error", "fetched_at", "pending")

    def __init__(self, uri: str, timeout: float, discover: bool = False) -> None:
        self.uri = uri  # the jwksUri, or (discover) the issuer's OpenID configuration, whose jwks_uri is fetched
        self.timeout = timeout
        self.discover = discover
        self.keys: jwt.PyJWKSet | None = None
        self.error = ""  # the last fetch's failure, "" after a good one
        self.fetched_at: float | None = None  # monotonic time of the last attempt that finished
        self.pending: Any = None  # the fetch in flight (an awaitable the fetcher owns), if any

    @property
    def ready(self) -> bool:
        return self.keys is not None or self.fetched_at is not None


class JwksCache:
    """Process-wide: one RemoteJwks per URI."""

    def __init__(self) -> None:
        self.remotes: dict[str, RemoteJwks] = {}

    def remote(self, uri: str, timeout: float, discover: bool = False) -> RemoteJwks:
        found = self.remotes.get(uri)
        if found is None:
            found = self.remotes[uri] = RemoteJwks(uri, timeout, discover)
        return found


    def retain(self, used: Iterable[RemoteJwks]) -> None:
        """Forget the URIs the running config no longer names (they are not fetched again)."""
        keep = {remote.uri for remote in used}
        for uri in [u for u in self.remotes if u not in keep]:
            del self.remotes[uri]


OPENID_CONFIGURATION: Final = "/.well-known/openid-configuration"


def parse_jwks(text: str | bytes) -> jwt.PyJWKSet:
    """A JWKS document (or one JWK) -> PyJWT's key set; raises ValueError or PyJWTError."""
    import jwt

    data = json.loads(text)
    if isinstance(data, dict) and "keys" not in data:
        data = {"keys": [data]}
    return jwt.PyJWKSet.from_dict(data)


@dataclass(frozen=True, slots=True)
class Failure:
    status: int
    message: str

    @property
    def details(self) -> str:
        return f"{DETAILS_PREFIX}{{{'_'.join(self.message.split(' '))}}}"


@dataclass(frozen=True, slots=True)
class Provider:
    """One jwtRule, compiled."""

    issuer: str  # "" accepts any issuer (a rule with only a jwksUri)
    audiences: frozenset[str]
    keys: jwt.PyJWKSet | None  # inline jwks
    remote: RemoteJwks | None
    headers: tuple[m.JWTHeader, ...]
    params: tuple[str, ...]
    cookies: tuple[str, ...]
    payload_header: str
    forward: bool
    claim_headers: tuple[m.ClaimToHeader, ...]

    def key_set(self) -> jwt.PyJWKSet | None:
        return self.keys if self.remote is None else self.remote.keys


@dataclass(slots=True)
class AuthnResult:
    """What authentication decided: a failure to reply with, or the claims and the header changes upstream."""

    failure: Failure | None = None
    claims: Mapping[str, Any] | None = None
    remove: frozenset[bytes] = frozenset()  # header names dropped before the request goes upstream
    add: list[tuple[bytes, bytes]] = field(default_factory=list)
    waiting_for: RemoteJwks | None = None  # the keys are being fetched for the first time: ask again after

    @property
    def principal(self) -> str:
        claims = self.claims
        if claims is None:
            return ""
        return f"{claims.get('iss', '')}/{claims.get('sub', '')}"


PASS: Final = AuthnResult()


@dataclass(frozen=True, slots=True)
class _Token:
    value: str
    header: bytes  # the header it came in ("" for a parameter or cookie)
    providers: tuple[Provider, ...]  # those configured to read this location


def _prefix_value(value: str, prefix: str) -> str | None:
    if not prefix:
        return value.strip()
    if value[:len(prefix)].lower() == prefix.lower():
        return value[len(prefix):].strip()
    return None


class JwtAuthenticator:
    """Every provider of the workload; `authenticate` is the per-request call."""

    __slots__ = ("providers", "header_locations", "param_locations", "cookie_locations", "now")

    def __init__(self, providers: Sequence[Provider], now: Callable[[], float] = time.time) -> None:
        self.providers = tuple(providers)
        self.now = now
        headers: dict[tuple[str, str], list[Provider]] = {}
        params: dict[str, list[Provider]] = {}
        cookies: dict[str, list[Provider]] = {}
        for provider in self.providers:
            for location in provider.headers:
                headers.setdefault((location.name, location.prefix), []).append(provider)
            for param in provider.params:
                params.setdefault(param, []).append(provider)
            for cookie in provider.cookies:
                cookies.setdefault(cookie, []).append(provider)
        self.header_locations = tuple((name.encode("latin-1"), prefix, tuple(p)) for (name, prefix), p in headers.items())
        self.param_locations = tuple((name, tuple(p)) for name, p in params.items())
        self.cookie_locations = tuple((name, tuple(p)) for name, p in cookies.items())

    def remotes(self) -> list[RemoteJwks]:
        return [p.remote for p in self.providers if p.remote is not None]

    def _tokens(self, headers: Sequence[tuple[bytes, bytes]], query: bytes) -> list[_Token]:
        found: list[_Token] = []
        for name, prefix, providers in self.header_locations:
            for key, value in headers:
                if key == name:
                    token = _prefix_value(value.decode("latin-1"), prefix)
                    if token:
                        found.append(_Token(token, name, providers))
        if self.param_locations and query:
            pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=False)
            for param, param_providers in self.param_locations:
                found += [_Token(text, b"", param_providers) for key_text, text in pairs if key_text == param and text]
        if self.cookie_locations:
            for key, value in headers:
                if key != b"cookie":
                    continue
                jar: SimpleCookie = SimpleCookie()
                try:
                    jar.load(value.decode("latin-1"))
                except CookieError:
                    continue
                for cookie, cookie_providers in self.cookie_locations:
                    if cookie in jar and jar[cookie].value:
                        found.append(_Token(jar[cookie].value, b"", cookie_providers))
        return found

    def authenticate(self, headers: Sequence[tuple[bytes, bytes]], query: bytes) -> AuthnResult:
        tokens = self._tokens(headers, query)
        if not tokens:
            return PASS
        first_failure: Failure | None = None
        for token in tokens:
            outcome = self._verify(token)
            if isinstance(outcome, RemoteJwks):
                return AuthnResult(waiting_for=outcome)
            if isinstance(outcome, Failure):
                first_failure = first_failure or outcome
                continue
            provider, claims = outcome
            return self._success(token, provider, claims, tokens)
        return AuthnResult(failure=first_failure)

    def _verify(self, token: _Token) -> Failure | RemoteJwks | tuple[Provider, dict[str, Any]]:
        import jwt

        try:
            header = jwt.get_unverified_header(token.value)
            unverified = jwt.decode(token.value, options={"verify_signature": False})
        except jwt.PyJWTError:
            return Failure(401, BAD_FORMAT)
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str):
            return Failure(401, BAD_ALG)
        if alg not in SUPPORTED_ALGS:
            return Failure(401, ALG_NOT_SUPPORTED)
        if kid is not None and not isinstance(kid, str):
            return Failure(401, BAD_KID)
        issuer = unverified.get("iss")
        if issuer is not None and not isinstance(issuer, str):
            return Failure(401, ISS_NOT_STRING)
        candidates = [p for p in token.providers if not p.issuer or p.issuer == issuer]
        if not candidates:
            return Failure(401, UNKNOWN_ISSUER)
        failure: Failure | None = None
        for provider in candidates:
            outcome = self._verify_with(token.value, header, unverified, provider)
            if isinstance(outcome, (Failure, RemoteJwks)):
                if isinstance(outcome, RemoteJwks):
                    return outcome
                failure = failure or outcome
                continue
            return provider, outcome
        assert failure is not None
        return failure

    def _verify_with(self, token: str, header: Mapping[str, Any], unverified: Mapping[str, Any],
                     provider: Provider) -> Failure | RemoteJwks | dict[str, Any]:
        import jwt

        keys = provider.key_set()
        if keys is None:
            remote = provider.remote
            if remote is not None and not remote.ready:
                return remote  # first fetch still under way
            return Failure(401, JWKS_FETCH_FAILED)
        alg, kid = str(header.get("alg")), header.get("kid")  # checked in _verify: a supported name
        candidates = [k for k in keys.keys if (kid is None or k.key_id == kid) and _key_fits(k, alg)]
        if not candidates:
            return Failure(401, KID_ALG_MISMATCH)
        now = self.now()
        exp, nbf = unverified.get("exp"), unverified.get("nbf")
        for key in candidates:
            try:
                claims = jwt.decode(token, key=key.key, algorithms=[alg],
                                    options={"verify_exp": False, "verify_nbf": False, "verify_iat": False,
                                             "verify_aud": False, "verify_iss": False})
            except jwt.PyJWTError:  # a bad signature for this key (or a key PyJWT cannot use): try the next one
                continue
            if isinstance(exp, (int, float)) and not isinstance(exp, bool) and now > exp + CLOCK_SKEW:
                return Failure(401, EXPIRED)
            if isinstance(nbf, (int, float)) and not isinstance(nbf, bool) and now + CLOCK_SKEW < nbf:
                return Failure(401, NOT_YET_VALID)
            if provider.audiences and not _audience_allowed(claims.get("aud"), provider.audiences):
                return Failure(403, AUDIENCE_NOT_ALLOWED)
            return claims
        return Failure(401, VERIFICATION_FAILS)

    def _success(self, token: _Token, provider: Provider, claims: dict[str, Any], tokens: Iterable[_Token]) -> AuthnResult:
        remove: set[bytes] = set()
        if not provider.forward and token.header:
            remove.add(token.header)
        add: list[tuple[bytes, bytes]] = []
        if provider.payload_header:
            add.append((provider.payload_header.encode("latin-1"), token.value.split(".")[1].encode("latin-1")))
            remove.add(provider.payload_header.encode("latin-1"))
        for item in provider.claim_headers:
            value = _claim_text(claims, item.claim)
            if value is not None:
                add.append((item.header.encode("latin-1"), value.encode("utf-8")))
                remove.add(item.header.encode("latin-1"))
        return AuthnResult(claims=claims, remove=frozenset(remove), add=add)


KEY_TYPES: Final = {"RS": "RSA", "PS": "RSA", "ES": "EC", "HS": "oct", "Ed": "OKP"}


def _key_fits(key: jwt.PyJWK, alg: str) -> bool:
    """jwt_verify_lib's key choice: the key type of the algorithm's family, and the JWK's own `alg` if it has one."""
    if key.key_type != KEY_TYPES.get(alg[:2]):
        return False
    explicit = getattr(key, "_jwk_data", {}).get("alg")  # PyJWK fills in a default `algorithm_name` when absent
    return explicit is None or explicit == alg


def _audience_allowed(audience: Any, allowed: frozenset[str]) -> bool:
    if isinstance(audience, str):
        return audience in allowed
    if isinstance(audience, list):
        return any(isinstance(a, str) and a in allowed for a in audience)
    return False


def _claim_text(claims: Mapping[str, Any], name: str) -> str | None:
    """A claim as Envoy's claim_to_headers writes it: strings as they are, numbers and booleans as text."""
    value: Any = claims
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    return None


def compile_provider(rule: m.JWTRule, cache: JwksCache) -> Provider:
    headers, params, cookies = rule.from_headers, rule.from_params, rule.from_cookies
    if not headers and not params and not cookies:
        headers, params = (DEFAULT_HEADER,), (DEFAULT_PARAM,)
    keys = parse_jwks(rule.jwks) if rule.jwks else None
    remote = None
    if keys is None and rule.jwks_uri:
        remote = cache.remote(rule.jwks_uri, rule.timeout or 5.0)
    elif keys is None:  # neither: istiod looks the keys up with OpenID Connect discovery
        remote = cache.remote(rule.issuer.rstrip("/") + OPENID_CONFIGURATION, rule.timeout or 5.0, discover=True)
    return Provider(issuer=rule.issuer, audiences=frozenset(rule.audiences), keys=keys, remote=remote,
                    headers=headers, params=params, cookies=cookies, payload_header=rule.output_payload_to_header,
                    forward=rule.forward_original_token, claim_headers=rule.output_claim_to_headers)


def compile_jwt_authn(policies: Iterable[m.RequestAuthentication], workload: Workload,
                      cache: JwksCache) -> JwtAuthenticator | None:
    """The workload's authenticator; None when no RequestAuthentication selects it."""
    providers = [compile_provider(rule, cache) for policy in policies if selects(policy.meta, policy.scope, workload)
                 for rule in policy.jwt_rules]
    return JwtAuthenticator(providers) if providers else None
