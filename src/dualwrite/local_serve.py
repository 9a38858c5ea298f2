"""A `serve` running on this host's data, found by the CLI.

The embedded realtime tier (`memory://`) lives inside one process. A CLI `send` that wrote
to its own would save the message but deliver it to no one: the open page listens to the
`serve` process's tier. So while it runs on `memory://`, `serve` announces itself in
`serve.json` beside its retry queue (the data directory, `dualwrite-data/` by default), and
`dualwrite send` finds it there and sends through its HTTP API, as the page does: the
message reaches every open page live.
"""

from __future__ import annotations

import contextlib
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote, urlsplit

from dualwrite.errors import DualWriteError, InvalidInput, SendFailed
from dualwrite.model import SendResult, SendStatus, User
from dualwrite.redact import redact_url
from dualwrite.settings import ServerSettings, Settings

_TIMEOUT_S = 5.0


class ServeSilent(DualWriteError):
    """A `serve` is announced and its process lives, but it does not answer (starting, or
    hung)."""


@dataclass(frozen=True)
class LocalServe:
    """A running `serve` this command can send through."""

    url: str
    pid: int


def announcement(settings: Settings) -> Path:
    """Where a `serve` on these settings announces itself: beside its retry queue."""
    return Path(settings.queue_path).parent / "serve.json"


def shares_memory_tier(settings: Settings) -> bool:
    return urlsplit(settings.realtime_url).scheme == "memory"


@contextlib.contextmanager
def announced(settings: Settings, host: str, port: int) -> Iterator[None]:
    """Announce this `serve` while the block runs (on `memory://` only: any other realtime
    tier is shared by every process already)."""
    if not shares_memory_tier(settings):
        yield
        return
    path = announcement(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    reachable = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    record = {
        "url": f"http://{reachable}:{port}",
        "pid": os.getpid(),
        "store": redact_url(settings.store_url),
    }
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(record) + "\n")
    partial.replace(path)
    try:
        yield
    finally:
        # Only our own: another `serve` on the same data may have announced itself since.
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()


def find(settings: Settings) -> LocalServe | None:
    """The `serve` announced on these settings' data, if it shares their store, runs, and
    answers; else None (blocking: call it in a thread). Raises `ServeSilent` if it runs but
    does not answer."""
    if not shares_memory_tier(settings):
        return None
    try:
        record = json.loads(announcement(settings).read_text())
        url, pid, store = str(record["url"]), int(record["pid"]), str(record["store"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if store != redact_url(settings.store_url) or not _alive(pid):
        return None
    # This host only: the token sent along may be signed with the server's own secret, and
    # whoever can write the notice must not be able to send it elsewhere.
    if urlsplit(url).hostname not in ("127.0.0.1", "localhost", "::1"):
        return None
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=_TIMEOUT_S) as answer:
            if answer.status == 200:
                return LocalServe(url, pid)
    except (OSError, ValueError):
        pass
    raise ServeSilent(f"the serve announced at {url} (pid {pid}) does not answer")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def send_through(
    serve: LocalServe,
    workspace_id: str,
    channel_id: str,
    text: str,
    user: User,
    *,
    client_message_id: str | None,
    token_secret: str | None,
) -> SendResult:
    """`POST` the message to the running `serve` as ``user`` (blocking: call it in a thread).

    The token is minted with ``token_secret`` (the server's `DUALWRITE_TOKEN_SECRET`), else
    asked of the development sign-in that a `serve` without a secret offers.
    """
    if token_secret is not None:
        from dualwrite.server.auth import Identity, TokenSigner

        # The server's own settings: its issuer and audience are in the token it checks.
        signer = TokenSigner(token_secret, ServerSettings.from_env())
        token = signer.mint(Identity(user, workspace_id))
    else:
        status, body = _call(
            f"{serve.url}/api/dev/token",
            {"userId": user.id, "userName": user.name, "workspaceId": workspace_id},
        )
        if status != 200:
            raise DualWriteError(
                f"the running serve at {serve.url} gave no token ({status}): set "
                "DUALWRITE_TOKEN_SECRET as the server has it"
            )
        token = str(body["token"])
    payload: dict[str, Any] = {"text": text}
    if client_message_id is not None:
        payload["clientMessageId"] = client_message_id
    path = f"/api/workspaces/{quote(workspace_id, safe='')}/channels/{quote(channel_id, safe='')}"
    status, body = _call(f"{serve.url}{path}/messages", payload, token)
    if status in (201, 202):
        return SendResult(
            str(body["messageId"]), cast(SendStatus, body["status"]), int(body["timestamp"])
        )
    if status == 503:
        raise SendFailed()
    if status == 401:
        raise DualWriteError(
            f"the running serve at {serve.url} refused this command's token: give it the "
            "server's DUALWRITE_TOKEN_SECRET"
        )
    if status in (400, 413, 422):
        field = str(body.get("field", "request"))
        raise InvalidInput(field, str(body.get("error", status)).removeprefix(f"{field}: "))
    raise DualWriteError(f"the running serve at {serve.url} answered {status}: {body}")


def _call(url: str, payload: dict[str, Any], token: str | None = None) -> tuple[int, Any]:
    headers = {"content-type": "application/json"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        url, json.dumps(payload).encode(), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        with error:
            try:
                return error.code, json.loads(error.read())
            except ValueError:
                return error.code, {}
    except (OSError, ValueError) as error:
        raise DualWriteError(f"the running serve at {url} did not answer: {error}") from error
