"""Firebase ID tokens are accepted as an alternative to dualwrite's own tokens."""

from __future__ import annotations

import time
from typing import Any

import jwt

from tests.server.conftest import Api

MESSAGES = "/api/workspaces/acme/channels/general/messages"


def emulator_id_token(**overrides: Any) -> str:
    """An ID token as the Firebase Auth emulator issues it: unsigned (alg none)."""
    now = int(time.time())
    claims = {
        "iss": "https://securetoken.google.com/dualwrite-test",
        "aud": "dualwrite-test",
        "auth_time": now,
        "user_id": "fb-uid-1",
        "sub": "fb-uid-1",
        "iat": now,
        "exp": now + 3600,
        "name": "Grace",
        "workspaceId": "acme",
        "firebase": {"identities": {}, "sign_in_provider": "custom"},
    }
    claims.update(overrides)
    return jwt.encode({k: v for k, v in claims.items() if v is not None}, None, algorithm="none")  # type: ignore[arg-type]


def post(api: Api, token: str) -> Any:
    return api.client.post(
        MESSAGES, headers={"authorization": f"Bearer {token}"}, json={"text": "from Firebase"}
    )


def test_a_firebase_id_token_names_the_user_and_workspace(firebase_auth_api: Api) -> None:
    sent = post(firebase_auth_api, emulator_id_token())
    assert sent.status_code == 201
    page = firebase_auth_api.client.get(MESSAGES, headers=firebase_auth_api.auth()).json()
    [message] = page["messages"]
    assert (message["userId"], message["userName"]) == ("fb-uid-1", "Grace")


def test_our_own_tokens_still_work(firebase_auth_api: Api) -> None:
    response = firebase_auth_api.client.post(
        MESSAGES, headers=firebase_auth_api.auth(), json={"text": "hi"}
    )
    assert response.status_code == 201


def test_bad_firebase_tokens_are_refused(firebase_auth_api: Api) -> None:
    for token in (
        emulator_id_token(aud="another-project"),
        emulator_id_token(iss="https://securetoken.google.com/another-project"),
        emulator_id_token(exp=int(time.time()) - 5),
        emulator_id_token(workspaceId=None),
    ):
        assert post(firebase_auth_api, token).status_code == 401
    assert post(firebase_auth_api, emulator_id_token(workspaceId="globex")).status_code == 403


def test_a_user_without_a_display_name_is_shown_by_uid_never_by_email(
    firebase_auth_api: Api,
) -> None:
    token = emulator_id_token(name=None, email="grace@private.example")
    assert post(firebase_auth_api, token).status_code == 201
    page = firebase_auth_api.client.get(MESSAGES, headers=firebase_auth_api.auth()).json()
    [message] = page["messages"]
    assert message["userName"] == "fb-uid-1"
    assert "private.example" not in str(page)


def test_firebase_tokens_living_longer_than_the_maximum_are_refused(
    firebase_auth_api: Api,
) -> None:
    forever = int(time.time()) + 100 * 365 * 86400
    assert post(firebase_auth_api, emulator_id_token(exp=forever)).status_code == 401
