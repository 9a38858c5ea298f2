"""What the server's handlers share, kept on Starlette's ``app.state.server``."""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.requests import HTTPConnection

from dualwrite.server.auth import Authenticator, TokenSigner
from dualwrite.server.ratelimit import RateLimiter
from dualwrite.service import DualWrite
from dualwrite.settings import ServerSettings


@dataclass
class ServerState:
    settings: ServerSettings
    signer: TokenSigner
    authenticator: Authenticator
    limiter: RateLimiter
    _dw: DualWrite | None = field(default=None, init=False)

    def started(self, dw: DualWrite) -> None:
        self._dw = dw

    @property
    def dw(self) -> DualWrite:
        if self._dw is None:
            raise RuntimeError("the server's lifespan has not started")
        return self._dw


def server_state(connection: HTTPConnection) -> ServerState:
    state: ServerState = connection.app.state.server
    return state
