"""Fuzz of what an anonymous or hostile client controls: the WebSocket's first frame and the
history query. Every input gets a 4xx or a 4xxx/1003/1009 close, never a 5xx."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from dualwrite.settings import ServerSettings
from tests.server.conftest import SECRET, Api, _api

MESSAGES = "/api/workspaces/acme/channels/general/messages"
FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
first_frames = st.one_of(
    st.text(max_size=6000),
    st.binary(max_size=6000),
    json_values.map(json.dumps),
    json_values.map(lambda token: json.dumps({"token": token})),
    st.integers(1, 5000).map(lambda depth: "[" * depth),
)


@pytest.fixture
def unlimited(tmp_path: Path) -> Iterator[Api]:
    """A server whose rate limits are off, so that every example reaches the checks."""
    config = ServerSettings(token_secret=SECRET, read_rate_per_s=0, sign_in_rate_per_s=0)
    yield from _api(tmp_path, config)


@FUZZ
@given(frame=first_frames)
def test_any_first_frame_is_refused_with_a_close_code(unlimited: Api, frame: str | bytes) -> None:
    with connect(f"{unlimited.ws_base}/ws/workspaces/acme/channels/general") as ws:
        ws.send(frame)
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(10)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code in (4401, 1003, 1009)


@FUZZ
@given(
    limit=st.none() | st.text(max_size=50) | st.integers().map(str),
    before=st.none()
    | st.text(max_size=300)
    | st.builds(lambda t, i: f"{t}:{i}", st.text(), st.text()),
)
def test_any_history_query_is_answered_without_a_server_error(
    unlimited: Api, limit: str | None, before: str | None
) -> None:
    params = {k: v for k, v in (("limit", limit), ("before", before)) if v is not None}
    response = unlimited.client.get(MESSAGES, headers=unlimited.auth(), params=params)
    assert response.status_code in (200, 422), (params, response.text)
