"""Bearer tokens: HS256 JWTs (PyJWT) naming the user, their display name and their workspace."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import Any

import jwt

from dualwrite.model import User
from dualwrite.validation import check_id, check_user

ALGORITHM = "HS256"
DEFAULT_LIFETIME_S = 12 * 3600


class Unauthorized(Exception):
    """Missing, malformed, forged or expired token (HTTP 401)."""


@dataclass(frozen=True)
class Identity:
    user: User
    workspace_id: str


class TokenSigner:
    def __init__(self, secret: str) -> None:
        if len(secret) < 32:
            raise ValueError("the token secret must be at least 32 characters")
        self._secret = secret

    def mint(self, identity: Identity, lifetime_s: int = DEFAULT_LIFETIME_S) -> str:
        check_user(identity.user)
        check_id("workspaceId", identity.workspace_id)
        now = int(time.time())
        claims = {
            "sub": identity.user.id,
            "name": identity.user.name,
            "workspaceId": identity.workspace_id,
            "iat": now,
            "exp": now + lifetime_s,
        }
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)

    def verify(self, token: str) -> Identity:
        try:
            # Only HS256: "alg: none" and algorithm-confusion tokens are refused here.
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                options={"require": ["sub", "name", "workspaceId", "exp"]},
            )
        except jwt.PyJWTError as error:
            raise Unauthorized(str(error)) from None
        try:
            user = check_user(User(str(claims["sub"]), str(claims["name"])))
            workspace = check_id("workspaceId", str(claims["workspaceId"]))
        except ValueError as error:
            raise Unauthorized(str(error)) from None
        return Identity(user, workspace)


class FirebaseIdTokens:
    """Accepts Firebase ID tokens (`firebase_admin.auth.verify_id_token`) of one project.

    The token's uid is the user id, its `name` claim the display name, and its `workspaceId`
    custom claim the workspace. With `FIREBASE_AUTH_EMULATOR_HOST` set, firebase-admin accepts
    the Auth emulator's unsigned tokens, which is how the tests exercise this.
    """

    def __init__(self, project_id: str) -> None:
        self._project_id = project_id
        self._app: Any = None

    def verify(self, token: str) -> Identity:
        from firebase_admin import auth

        from dualwrite.backends import _firebase_app

        if self._app is None:
            self._app = _firebase_app.initialize(
                {"projectId": self._project_id}, emulated=auth_emulated()
            )
        try:
            claims = auth.verify_id_token(token, app=self._app)
        except (ValueError, auth.InvalidIdTokenError, auth.CertificateFetchError) as error:
            raise Unauthorized(f"not a valid Firebase ID token: {error}") from None
        # The emulator path skips expiry checks; never accept an expired token.
        if int(claims.get("exp", 0)) <= int(time.time()):
            raise Unauthorized("the Firebase ID token has expired")
        workspace = claims.get("workspaceId")
        if not isinstance(workspace, str):
            raise Unauthorized("the Firebase ID token has no workspaceId custom claim")
        name = claims.get("name") or claims.get("email") or claims["uid"]
        try:
            return Identity(
                check_user(User(str(claims["uid"]), str(name))), check_id("workspaceId", workspace)
            )
        except ValueError as error:
            raise Unauthorized(str(error)) from None


def auth_emulated() -> bool:
    return bool(os.environ.get("FIREBASE_AUTH_EMULATOR_HOST"))


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
