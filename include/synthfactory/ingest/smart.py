"""Authentication for FHIR servers: SMART Backend Services, plain bearer tokens, HTTP basic.

SMART Backend Services (client_credentials with a signed JWT assertion):

1. discover the token endpoint at ``[base]/.well-known/smart-configuration`` (unless given);
2. sign a JWT with the client's private key: RS384 (RSA) or ES384 (EC P-384), from a PEM or a JWKS
   (``iss`` = ``sub`` = client id, ``aud`` = token URL, ``exp`` <= 5 minutes, a unique ``jti``, header
   ``kid`` and optionally ``jku``);
3. POST ``grant_type=client_credentials``, ``scope``, ``client_assertion_type`` and ``client_assertion``;
4. cache the access token until shortly before it expires; on a 401 the caller drops it
   (:meth:`SmartAuth.invalidate`) and authenticates once more.

:class:`AuthConfig` is a plain dataclass with no Airflow import; the Airflow ``FhirHook`` only turns a
connection into one. The HTTP exchanges are split into pure request/response steps so the same logic runs
on a sync ``httpx.Client`` and on an ``httpx.AsyncClient`` (the deferrable trigger).
"""

from __future__ import annotations

import base64
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Literal
from synthfactory.errors import ConfigError, TransientError

__all__ = ["AuthConfig", "SmartAuth", "AuthError", "AuthRefused", "load_signing_key"]

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
TOKEN_SKEW_SECONDS = 30
ASSERTION_LIFETIME = 300


class AuthError(TransientError, RuntimeError):
    """Authentication could not be done now (the token endpoint failed or gave no token, no token endpoint
    found): may work when retried. No secret in the message."""


class AuthRefused(ConfigError):
    """The credentials are refused or unusable (the token endpoint answered ``invalid_client``,
    ``invalid_scope``, ``unauthorized_client``...; a bad key; a config missing a field): retrying cannot help,
    the deployment's fhir connection must change (exit 2). No secret in the message."""

    label = "authentication refused"


@dataclass(frozen=True)
class AuthConfig:
    """How to authenticate to a FHIR server.

    kind: ``none`` | ``bearer`` (``token``) | ``basic`` (``username``/``password``) | ``smart``
    (``client_id`` + ``private_key`` PEM or ``jwks`` JSON, optional ``kid``, ``alg``, ``scope``,
    ``token_url``, ``jku``)."""

    kind: Literal["none", "bearer", "basic", "smart"] = "none"
    token: str | None = field(default=None, repr=False)
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    client_id: str | None = None
    private_key: str | None = field(default=None, repr=False)
    jwks: Any = field(default=None, repr=False)
    kid: str | None = None
    alg: str | None = None
    scope: str = "system/*.read"
    token_url: str | None = None
    jku: str | None = None

    def __post_init__(self) -> None:
        if self.kind == "bearer" and not self.token:
            raise AuthRefused("bearer auth needs a token")
        if self.kind == "basic" and not self.username:
            raise AuthRefused("basic auth needs a username")
        if self.kind == "smart":
            if not self.client_id:
                raise AuthRefused("SMART backend auth needs a client_id")
            if not (self.private_key or self.jwks):
                raise AuthRefused("SMART backend auth needs a private key (PEM) or a JWKS")
        if self.alg is not None and self.alg not in ("RS384", "ES384"):
            raise AuthRefused(f"unsupported signing algorithm {self.alg!r} (RS384 or ES384)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "AuthConfig":
        return cls(**(d or {}))


def load_signing_key(config: AuthConfig) -> tuple[Any, str, str | None]:
    """(private key object, algorithm, kid) from a PEM or a JWKS (the key with ``kid``, else the first
    private one). RSA -> RS384, EC -> ES384 unless ``alg`` says otherwise."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    kid = config.kid
    if config.private_key:
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        try:
            key = load_pem_private_key(config.private_key.encode(), password=None)
        except (ValueError, TypeError):
            raise AuthRefused("the private key is not a readable unencrypted PEM") from None
    else:
        import jwt
        import orjson

        jwks = config.jwks
        if isinstance(jwks, (str, bytes)):
            try:
                jwks = orjson.loads(jwks)
            except orjson.JSONDecodeError:
                raise AuthRefused("the JWKS is not valid JSON") from None
        keys = jwks.get("keys", [jwks]) if isinstance(jwks, dict) else []
        private = [k for k in keys if isinstance(k, dict) and "d" in k]
        if kid:
            private = [k for k in private if k.get("kid") == kid] or private
        if not private:
            raise AuthRefused("the JWKS holds no private key")
        jwk = private[0]
        kid = kid or jwk.get("kid")
        try:
            key = jwt.PyJWK(jwk).key
        except Exception:  # noqa: BLE001 - PyJWT raises several types
            raise AuthRefused("the JWKS private key cannot be read") from None
        if config.alg is None and jwk.get("alg") in ("RS384", "ES384"):
            return key, jwk["alg"], kid
    if isinstance(key, rsa.RSAPrivateKey):
        alg = config.alg or "RS384"
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        alg = config.alg or "ES384"
    else:
        raise AuthRefused("the private key must be RSA (RS384) or EC P-384 (ES384)")
    return key, alg, kid


class SmartAuth:
    """Authorization headers for one server, with the SMART token cached until it expires.

    Thread-safe for the sync path. ``clock`` is injectable for tests."""

    def __init__(self, config: AuthConfig, base_url: str, *, clock: Any = time.time):
        self.config = config
        self.base_url = base_url.rstrip("/")
        self.clock = clock
        self._token: str | None = None
        self._expires = 0.0
        self._token_url = config.token_url
        self._lock = threading.Lock()
        self._key: tuple[Any, str, str | None] | None = None
        self.tokens_fetched = 0

    # -- pure steps ----------------------------------------------------------------------------------
    @property
    def needs_token(self) -> bool:
        return self.config.kind == "smart"

    def discovery_url(self) -> str:
        return f"{self.base_url}/.well-known/smart-configuration"

    def accept_discovery(self, status: int, body: Any) -> str:
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("token_endpoint"), str):
            raise AuthError(f"SMART discovery failed at {self.discovery_url()} (HTTP {status}, no token_endpoint)")
        self._token_url = body["token_endpoint"]
        return self._token_url

    def assertion(self, token_url: str) -> str:
        import jwt

        if self._key is None:
            self._key = load_signing_key(self.config)
        key, alg, kid = self._key
        now = int(self.clock())
        claims = {"iss": self.config.client_id, "sub": self.config.client_id, "aud": token_url,
                  "exp": now + ASSERTION_LIFETIME, "iat": now, "jti": uuid.uuid4().hex}
        headers = {"typ": "JWT"}
        if kid:
            headers["kid"] = kid
        if self.config.jku:
            headers["jku"] = self.config.jku
        return jwt.encode(claims, key, algorithm=alg, headers=headers)

    def token_form(self, token_url: str) -> dict[str, str]:
        return {"grant_type": "client_credentials", "scope": self.config.scope,
                "client_assertion_type": ASSERTION_TYPE, "client_assertion": self.assertion(token_url)}

    def accept_token(self, status: int, body: Any) -> str:
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
            err = body.get("error") if isinstance(body, dict) else None
            err = "".join(c for c in str(err) if c.isalnum() or c in "_-")[:40] if err else None  # an OAuth code only
            what = f"HTTP {status}{', ' + err if err else ''}"
            if 400 <= status < 500 and status not in (408, 429):  # the client, its key or its scope: not transient
                raise AuthRefused(f"the token endpoint refused the client ({what}): check the fhir connection's "
                                  f"client id, key and scope")
            raise AuthError(f"the token endpoint gave no token ({what})")
        try:
            lifetime = float(body.get("expires_in", 300))
        except (TypeError, ValueError):
            lifetime = 300.0
        self._token = body["access_token"]
        self._expires = self.clock() + max(lifetime - TOKEN_SKEW_SECONDS, lifetime / 2)
        self.tokens_fetched += 1
        return self._token

    def cached_headers(self) -> dict[str, str] | None:
        """Headers if no network step is needed (none/bearer/basic, or a SMART token still valid)."""
        c = self.config
        if c.kind == "none":
            return {}
        if c.kind == "bearer":
            return {"Authorization": f"Bearer {c.token}"}
        if c.kind == "basic":
            raw = f"{c.username}:{c.password or ''}".encode()
            return {"Authorization": "Basic " + base64.b64encode(raw).decode()}
        if self._token is not None and self.clock() < self._expires:
            return {"Authorization": f"Bearer {self._token}"}
        return None

    def invalidate(self) -> bool:
        """Drop the cached token (after a 401). True when re-authenticating can help (SMART)."""
        self._token = None
        self._expires = 0.0
        return self.config.kind == "smart"

    # -- sync ----------------------------------------------------------------------------------------
    def headers(self, client: Any) -> dict[str, str]:
        """Authorization headers, fetching a SMART token with ``client`` (httpx.Client) when needed."""
        h = self.cached_headers()
        if h is not None:
            return h
        with self._lock:
            h = self.cached_headers()
            if h is not None:
                return h
            token_url = self._token_url
            if not token_url:
                r = client.get(self.discovery_url(), headers={"Accept": "application/json"})
                token_url = self.accept_discovery(r.status_code, _json(r))
            r = client.post(token_url, data=self.token_form(token_url), headers={"Accept": "application/json"})
            return {"Authorization": f"Bearer {self.accept_token(r.status_code, _json(r))}"}

    # -- async ---------------------------------------------------------------------------------------
    async def aheaders(self, client: Any) -> dict[str, str]:
        """The same with an ``httpx.AsyncClient``."""
        h = self.cached_headers()
        if h is not None:
            return h
        token_url = self._token_url
        if not token_url:
            r = await client.get(self.discovery_url(), headers={"Accept": "application/json"})
            token_url = self.accept_discovery(r.status_code, _json(r))
        r = await client.post(token_url, data=self.token_form(token_url), headers={"Accept": "application/json"})
        return {"Authorization": f"Bearer {self.accept_token(r.status_code, _json(r))}"}


def _json(response: Any) -> Any:
    try:
        return response.json()
    except Exception:  # noqa: BLE001 - not JSON
        return None
