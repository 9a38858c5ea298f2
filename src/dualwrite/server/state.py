"""What the server's handlers share, kept on Starlette's ``app.state.server``."""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from starlette.requests import HTTPConnection

from dualwrite.server.auth import Authenticator, TokenSigner
from dualwrite.server.notices import NoticeRelay
from dualwrite.server.ratelimit import RateLimits
from dualwrite.service import DualWrite
from dualwrite.settings import ServerSettings


@dataclass
class SocketCounts:
    """This process's WebSockets: waiting for their token (by client address), and live
    ones (by user)."""

    unauthenticated: int = 0
    unauthenticated_by_address: Counter[str] = field(default_factory=Counter)
    live: int = 0
    by_user: Counter[str] = field(default_factory=Counter)

    def waiting(self, address: str) -> None:
        self.unauthenticated += 1
        self.unauthenticated_by_address[address] += 1

    def done_waiting(self, address: str) -> None:
        self.unauthenticated -= 1
        self.unauthenticated_by_address[address] -= 1
        if self.unauthenticated_by_address[address] <= 0:
            del self.unauthenticated_by_address[address]

    def join(self, user_key: str) -> None:
        self.live += 1
        self.by_user[user_key] += 1

    def leave(self, user_key: str) -> None:
        self.live -= 1
        self.by_user[user_key] -= 1
        if self.by_user[user_key] <= 0:
            del self.by_user[user_key]


@dataclass
class ServerState:
    settings: ServerSettings
    signer: TokenSigner
    authenticator: Authenticator
    limits: RateLimits
    sockets: SocketCounts = field(default_factory=SocketCounts)
    _dw: DualWrite | None = field(default=None, init=False)
    _notices: NoticeRelay | None = field(default=None, init=False)
    _known_channels: OrderedDict[tuple[str, str], None] = field(
        default_factory=OrderedDict, init=False
    )

    def first_sight(self, workspace_id: str, channel_id: str) -> bool:
        """True the first time this process sees a channel (within its last 10,000)."""
        key = (workspace_id, channel_id)
        if key in self._known_channels:
            self._known_channels.move_to_end(key)
            return False
        self._known_channels[key] = None
        if len(self._known_channels) > 10_000:
            self._known_channels.popitem(last=False)
        return True

    def started(self, dw: DualWrite) -> None:
        self._dw = dw
        self._notices = NoticeRelay(dw)

    @property
    def notices(self) -> NoticeRelay:
        if self._notices is None:
            raise RuntimeError("the server's lifespan has not started")
        return self._notices

    @property
    def dw(self) -> DualWrite:
        if self._dw is None:
            raise RuntimeError("the server's lifespan has not started")
        return self._dw


def server_state(connection: HTTPConnection) -> ServerState:
    state: ServerState = connection.app.state.server
    return state
