"""Bearer tokens: HS256 JWTs (PyJWT) naming the user, their display name and their workspace."""

from __future__ import annotations

import time
from dataclasses import dataclass

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


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise Unauthorized("missing Authorization header")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("expected 'Authorization: Bearer <token>'")
    return token.strip()
