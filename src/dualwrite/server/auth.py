"""Bearer tokens: HS256 JWTs (PyJWT) naming the user, their display name and their workspace."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import jwt

from dualwrite.model import User
from dualwrite.settings import ServerSettings
from dualwrite.validation import check_id, check_user

log = logging.getLogger(__name__)

ALGORITHM = "HS256"
# Clock skew tolerated between servers on `iat`/`exp`.
_LEEWAY_S = 60


class Unauthorized(Exception):
    """Missing, malformed, forged or expired token (HTTP 401, WebSocket 4401)."""


@dataclass(frozen=True)
class Identity:
    user: User
    workspace_id: str
    expires_at: float | None = field(default=None, compare=False)
    """When the token that proved it expires (Unix seconds); None while minting."""


_VERIFIED_KEPT = 4096
"""Verified tokens a process remembers (about 2 MB)."""


class TokenSigner:
    """Mints and checks our HS256 tokens: `iss`, `aud`, `iat` and `exp` required, and no
    token lives longer than `ServerSettings.token_max_lifetime_s`."""

    def __init__(self, secret: str, settings: ServerSettings) -> None:
        if len(secret) < 32:
            raise ValueError("the token secret must be at least 32 characters")
        self._secret = secret
        self._issuer = settings.token_issuer
        self._audience = settings.token_audience
        self.max_lifetime_s = settings.token_max_lifetime_s
        # A client sends the same token with every request until it renews it: checking its
        # HMAC and claims again each time cost a tenth of a send's CPU. A token that passed
        # keeps passing until its `exp` (nothing else in it changes with time), so what it
        # proved is kept until then; the oldest entries go first when the cache is full.
        self._verified: dict[str, Identity] = {}

    def issue(self, identity: Identity, lifetime_s: int | None = None) -> tuple[str, int]:
        """A token for ``identity`` and its expiry in Unix milliseconds; the lifetime is at
        most the maximum (None: the maximum)."""
        lifetime = self.max_lifetime_s if lifetime_s is None else lifetime_s
        if not 0 < lifetime <= self.max_lifetime_s:
            raise ValueError(f"a token lives from 1 to {self.max_lifetime_s} seconds")
        check_user(identity.user)
        check_id("workspaceId", identity.workspace_id)
        now = int(time.time())
        claims = {
            "sub": identity.user.id,
            "name": identity.user.name,
            "workspaceId": identity.workspace_id,
            "iss": self._issuer,
            "aud": self._audience,
            "iat": now,
            "exp": now + lifetime,
        }
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM), (now + lifetime) * 1000

    def mint(self, identity: Identity, lifetime_s: int | None = None) -> str:
        return self.issue(identity, lifetime_s)[0]

    def verify(self, token: str) -> Identity:
        known = self._verified.get(token)
        if known is not None:
            assert known.expires_at is not None
            if known.expires_at > time.time():
                return known
            del self._verified[token]
        identity = self._verify(token)
        if len(self._verified) >= _VERIFIED_KEPT:
            del self._verified[next(iter(self._verified))]
        self._verified[token] = identity
        return identity

    def _verify(self, token: str) -> Identity:
        try:
            # Only HS256: "alg: none" and algorithm-confusion tokens are refused here.
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                issuer=self._issuer,
                audience=self._audience,
                leeway=_LEEWAY_S,
                options={"require": ["sub", "name", "workspaceId", "exp", "iat", "iss", "aud"]},
            )
        # ValueError too: a first frame can carry text no encoder takes (a lone surrogate).
        except (jwt.PyJWTError, ValueError) as error:
            raise Unauthorized(str(error)) from None
        expires_at = _bounded_expiry(claims, self.max_lifetime_s)
        try:
            user = check_user(User(str(claims["sub"]), str(claims["name"])))
            workspace = check_id("workspaceId", str(claims["workspaceId"]))
        except ValueError as error:
            raise Unauthorized(str(error)) from None
        return Identity(user, workspace, expires_at)


def _bounded_expiry(claims: dict[str, Any], max_lifetime_s: int) -> float:
    """The token's `exp`, if it lies within the maximum lifetime of both `iat` and now."""
    try:
        expires_at, issued_at = float(claims["exp"]), float(claims.get("iat", 0))
    except (TypeError, ValueError):
        raise Unauthorized("exp and iat must be numbers") from None
    now = time.time()
    if expires_at <= now:
        raise Unauthorized("the token has expired")
    if expires_at - issued_at > max_lifetime_s + _LEEWAY_S or expires_at - now > (
        max_lifetime_s + _LEEWAY_S
    ):
        raise Unauthorized(f"the token lives longer than the maximum of {max_lifetime_s} s")
    return expires_at


class FirebaseIdTokens:
    """Accepts Firebase ID tokens (`firebase_admin.auth.verify_id_token`) of one project.

    The token's uid is the user id, its `name` claim the display name, and its `workspaceId`
    custom claim the workspace; a user without a display name is shown by uid (never by their
    email). ``emulated`` (development only, `--firebase-auth-emulator`) accepts the Auth
    emulator's unsigned tokens named by `FIREBASE_AUTH_EMULATOR_HOST`, which is how the tests
    exercise this; without it the server refuses to start while that variable is set.
    """

    def __init__(self, project_id: str, max_lifetime_s: int, emulated: bool) -> None:
        self._project_id = project_id
        self._max_lifetime_s = max_lifetime_s
        self._emulated = emulated
        self._app: Any = None

    def verify(self, token: str) -> Identity:
        from firebase_admin import auth

        from dualwrite.backends import _firebase_app

        if self._app is None:
            self._app = _firebase_app.initialize(
                {"projectId": self._project_id}, emulated=self._emulated
            )
        try:
            claims = auth.verify_id_token(token, app=self._app)
        except (ValueError, auth.InvalidIdTokenError, auth.CertificateFetchError) as error:
            raise Unauthorized(f"not a valid Firebase ID token: {error}") from None
        except Exception as error:
            # A server-side problem (no Google credentials, ...): the caller is not signed in,
            # and the operator reads why in the log; never a 500 with a traceback.
            log.error("cannot verify Firebase ID tokens: %r", error)
            raise Unauthorized("Firebase ID tokens cannot be verified now") from None
        # The emulator path skips expiry checks; never accept an expired token.
        expires_at = _bounded_expiry(claims, self._max_lifetime_s)
        workspace = claims.get("workspaceId")
        if not isinstance(workspace, str):
            raise Unauthorized("the Firebase ID token has no workspaceId custom claim")
        # Never the email: the name is shown to everyone in the channel.
        name = claims.get("name") or claims["uid"]
        try:
            return Identity(
                check_user(User(str(claims["uid"]), str(name))),
                check_id("workspaceId", workspace),
                expires_at,
            )
        except ValueError as error:
            raise Unauthorized(str(error)) from None


def auth_emulator_host() -> str | None:
    """The Firebase Auth emulator firebase-admin would trust (unsigned tokens), if any."""
    return os.environ.get("FIREBASE_AUTH_EMULATOR_HOST") or None


class Authenticator:
    """Our own HS256 tokens first, then (if configured) Firebase ID tokens."""

    def __init__(self, signer: TokenSigner, firebase: FirebaseIdTokens | None = None) -> None:
        self.signer = signer
        self._firebase = firebase

    async def identify(self, token: str) -> Identity:
        try:
            return self.signer.verify(token)
        except Unauthorized:
            if self._firebase is None:
                raise
        # verify_id_token may fetch Google's certificates: keep it off the event loop.
        return await asyncio.to_thread(self._firebase.verify, token)


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise Unauthorized("missing Authorization header")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("expected 'Authorization: Bearer <token>'")
    return token.strip()
