"""deploy/firebase/database.rules.json, evaluated by targaryen (npm): what a client may do.

The server writes with the Admin SDK, which bypasses these rules; they bind the seed's web
clients, which write `messages/{ws}/{ch}/{id}` themselves (story 4.4), and whatever lands
there the reconciler later saves for good under the `userId` it carries.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest

from dualwrite.ids import PushIdGenerator
from dualwrite.model import REALTIME_TTL_MS, RealtimeMessage
from dualwrite.settings import Settings
from dualwrite.validation import MAX_USER_NAME_CHARS
from tests.firebase.servers import HERE as FIREBASE_TESTS
from tests.firebase.servers import NODE_MODULES

MAX_TEXT_CHARS = Settings().max_text_chars
RULES = Path(__file__).parents[2] / "deploy" / "firebase" / "database.rules.json"
EVALUATOR = FIREBASE_TESTS / "evaluate_rules.js"

NOW = 1_760_000_000_000
WS, CH = "acme", "general"
ADA = {"uid": "u1", "provider": "password", "token": {"workspaceId": WS, "name": "Ada"}}
BOB = {"uid": "u2", "provider": "password", "token": {"workspaceId": WS, "name": "Bob"}}
OUTSIDER = {"uid": "u9", "provider": "password", "token": {"workspaceId": "other"}}
NO_CLAIM = {"uid": "u1", "provider": "password", "token": {}}

MESSAGE_ID = PushIdGenerator(lambda: NOW).new_id()
MESSAGE_PATH = f"messages/{WS}/{CH}/{MESSAGE_ID}"
CHANNEL_PATH = f"messages/{WS}/{CH}"


def message(**changes: Any) -> dict[str, Any]:
    """Ada's message as dualwrite lays it out (and the seed's client writes it), changed."""
    wire = RealtimeMessage(
        message_id=MESSAGE_ID,
        user_id="u1",
        user_name="Ada",
        text="hello",
        timestamp=NOW,
        ttl=NOW + REALTIME_TTL_MS,
    ).to_wire()
    wire.update(changes)
    return {k: v for k, v in wire.items() if v is not None}


def sent_at(ms: int) -> dict[str, Any]:
    return message(timestamp=ms, ttl=ms + REALTIME_TTL_MS)


def holding(record: dict[str, Any], path: str = MESSAGE_PATH) -> dict[str, Any]:
    """A database holding ``record`` at ``path``."""
    data: dict[str, Any] = record
    for key in reversed(path.split("/")):
        data = {key: data}
    return data


BOBS_MESSAGE = holding(message(userId="u2", userName="Bob"))
ADAS_MESSAGE = holding(message())


@dataclass(frozen=True)
class Case:
    op: Literal["write", "read"]
    path: str
    auth: dict[str, Any] | None
    allowed: bool
    value: Any = None
    data: Any = None
    now: int = NOW


def write(
    value: Any,
    allowed: bool,
    *,
    auth: dict[str, Any] | None = ADA,
    path: str = MESSAGE_PATH,
    data: Any = None,
) -> Case:
    return Case("write", path, auth, allowed, value, data)


def read(path: str, allowed: bool, *, auth: dict[str, Any] | None = ADA) -> Case:
    return Case("read", path, auth, allowed)


CASES: dict[str, Case] = {
    # Creating a message: only as yourself, in your own workspace, in the seed's layout.
    "own message accepted": write(message(), True),
    "own message with a fresh push id accepted": write(
        message(), True, path=f"{CHANNEL_PATH}/{PushIdGenerator(lambda: NOW + 5).new_id()}"
    ),
    "another userId refused": write(message(userId="u2"), False),
    "a numeric userId refused": write(message(userId=1), False),
    "unauthenticated refused": write(message(), False, auth=None),
    "member of another workspace refused": write(message(userId="u9"), False, auth=OUTSIDER),
    "token without a workspace claim refused": write(message(), False, auth=NO_CLAIM),
    # text: a string of 1 to 40,000 characters, not blank.
    "text at the limit accepted": write(message(text="x" * MAX_TEXT_CHARS), True),
    "text over the limit refused": write(message(text="x" * (MAX_TEXT_CHARS + 1)), False),
    "1 MB text refused": write(message(text="x" * 1_000_000), False),
    "numeric text refused": write(message(text=42), False),
    "boolean text refused": write(message(text=True), False),
    "object text refused": write(message(text={"html": "<b>hi</b>"}), False),
    "empty text refused": write(message(text=""), False),
    "blank text refused": write(message(text=" \n\t "), False),
    "missing text refused": write(message(text=None), False),
    "emoji and newlines kept": write(message(text="héllo 👋\nworld"), True),
    # userName: a string of 1 to 256 characters, not blank.
    "userName at the limit accepted": write(message(userName="A" * MAX_USER_NAME_CHARS), True),
    "userName over the limit refused": write(
        message(userName="A" * (MAX_USER_NAME_CHARS + 1)), False
    ),
    "numeric userName refused": write(message(userName=7), False),
    "blank userName refused": write(message(userName="  "), False),
    "missing userName refused": write(message(userName=None), False),
    # timestamp: an integer within a minute of the server's clock; ttl exactly an hour later.
    "timestamp 59 s behind accepted": write(sent_at(NOW - 59_000), True),
    "timestamp 59 s ahead accepted": write(sent_at(NOW + 59_000), True),
    "timestamp an hour in the past refused": write(sent_at(NOW - 3_600_000), False),
    "timestamp 2 minutes in the future refused": write(sent_at(NOW + 120_000), False),
    "timestamp in 2100 refused": write(sent_at(4_102_444_800_000), False),
    "fractional timestamp refused": write(
        message(timestamp=NOW + 0.5, ttl=NOW + 0.5 + REALTIME_TTL_MS), False
    ),
    "string timestamp refused": write(message(timestamp=str(NOW)), False),
    "ttl in 2100 refused": write(message(ttl=4_102_444_800_000), False),
    "ttl one ms past timestamp + 1 h refused": write(message(ttl=NOW + REALTIME_TTL_MS + 1), False),
    "ttl before timestamp + 1 h refused": write(message(ttl=NOW + 1_000), False),
    "string ttl refused": write(message(ttl=str(NOW + REALTIME_TTL_MS)), False),
    "missing ttl refused": write(message(ttl=None), False),
    # Only the five fields; ids the permanent store can take.
    "extra field refused": write(message(admin=True), False),
    "extra nested field refused": write(message(meta={"pinned": True}), False),
    "a message that is not a record refused": write("hello", False),
    "message id not a push id refused": write(message(), False, path=f"{CHANNEL_PATH}/my-id"),
    "message id outside the push alphabet refused": write(
        message(), False, path=f"{CHANNEL_PATH}/-OAbcdefghijklmn%20q"
    ),
    "message id reserved by Firestore refused": write(
        message(), False, path=f"{CHANNEL_PATH}/__abcdefghijklmnop__"
    ),
    "channel id reserved by Firestore refused": write(
        message(), False, path=f"messages/{WS}/__channel__/{MESSAGE_ID}"
    ),
    # An existing message: only its author may rewrite or delete it.
    "overwriting another user's message refused": write(message(), False, data=BOBS_MESSAGE),
    "overwriting another user's message as them refused": write(
        message(userId="u2", userName="Bob", text="I owe Ada 100 EUR"), False, data=BOBS_MESSAGE
    ),
    "editing another user's text refused": write(
        "edited", False, path=f"{MESSAGE_PATH}/text", data=BOBS_MESSAGE
    ),
    "deleting another user's message refused": write(None, False, data=BOBS_MESSAGE),
    "author rewrites own message": write(message(text="edited"), True, data=ADAS_MESSAGE),
    "author deletes own message": write(None, True, data=ADAS_MESSAGE),
    "author cannot push own ttl to 2100": write(
        4_102_444_800_000, False, path=f"{MESSAGE_PATH}/ttl", data=ADAS_MESSAGE
    ),
    "author cannot hand own message to another user": write(
        "u2", False, path=f"{MESSAGE_PATH}/userId", data=ADAS_MESSAGE
    ),
    # Nothing else is writable by clients: the channel as a whole, idempotency claims, the rest.
    "writing a whole channel refused": write({MESSAGE_ID: message()}, False, path=CHANNEL_PATH),
    "writing a whole workspace refused": write(
        {CH: {MESSAGE_ID: message()}}, False, path=f"messages/{WS}"
    ),
    "writing an idempotency claim refused": write(
        {"messageId": MESSAGE_ID, "timestamp": NOW, "fingerprint": "x", "ttl": NOW + 1},
        False,
        path=f"sends/{WS}/u1/client-1",
    ),
    "writing a rate-limit bucket refused": write(
        {"tokens": 1000, "stamp": NOW, "ttl": NOW + 1}, False, path="limits/send:acme%2Fu1"
    ),
    "writing elsewhere refused": write({"x": 1}, False, path="anything/else"),
    # Reading: members of the workspace read its channels, and nothing else is readable.
    "member reads the channel": read(CHANNEL_PATH, True),
    "member reads one message": read(MESSAGE_PATH, True),
    "non-member read refused": read(CHANNEL_PATH, False, auth=OUTSIDER),
    "token without a workspace claim read refused": read(CHANNEL_PATH, False, auth=NO_CLAIM),
    "unauthenticated read refused": read(CHANNEL_PATH, False, auth=None),
    "reading the workspace's channel list refused": read(f"messages/{WS}", False),
    "reading idempotency claims refused": read(f"sends/{WS}/u1", False),
    "reading rate-limit buckets refused": read("limits", False),
    "reading the root refused": read("", False),
}


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    info: str


@pytest.fixture(scope="module")
def verdicts() -> dict[str, Verdict]:
    """Every case evaluated in one run of the evaluator (node starts once)."""
    if shutil.which("node") is None:
        pytest.fail("node is not installed: the Firebase rules are evaluated with targaryen (npm)")
    if not (NODE_MODULES / "targaryen").is_dir():
        pytest.fail("tests/firebase/node_modules lacks targaryen: run bash scripts/setup")
    request = {
        "rules": str(RULES),
        "cases": [
            {
                "op": c.op,
                "path": c.path,
                "auth": c.auth,
                "value": c.value,
                "data": c.data,
                "now": c.now,
            }
            for c in CASES.values()
        ],
    }
    run = subprocess.run(
        ["node", str(EVALUATOR)],
        cwd=FIREBASE_TESTS,
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    results = json.loads(run.stdout)
    return {
        name: Verdict(bool(r["allowed"]), str(r["info"]))
        for name, r in zip(CASES, results, strict=True)
    }


@pytest.mark.parametrize("name", CASES)
def test_rules(name: str, verdicts: dict[str, Verdict]) -> None:
    case = CASES[name]
    verdict = verdicts[name]
    assert verdict.allowed is case.allowed, verdict.info


def test_the_rules_limits_are_the_servers() -> None:
    """The numbers written into the rules are the ones the server checks."""
    rules = RULES.read_text()
    assert f"<= {MAX_TEXT_CHARS}" in rules
    assert f"<= {MAX_USER_NAME_CHARS}" in rules
    assert f"+ {REALTIME_TTL_MS}" in rules
