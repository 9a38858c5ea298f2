"""A small Realtime Database REST server for tests, written to Firebase's REST documentation
(https://firebase.google.com/docs/reference/rest/database and .../database/rest/retrieve-data).

`firebase-server` (npm) serves GET/PUT/PATCH/DELETE but ignores query parameters, has no ETags
and no streaming. This server adds exactly those documented behaviours, so that dualwrite's
real firebase-admin client can be exercised on them:
- queries: `orderBy` ("$key", "$value" or a child), `startAt`, `endAt`, `equalTo`,
  `limitToFirst`, `limitToLast` (JSON-encoded values), and `shallow=true`;
- `X-Firebase-ETag: true` on GET, `if-match` on PUT (412 with the current value and ETag);
- `print=silent` (204);
- streaming with `Accept: text/event-stream`: a first `put` of the whole location, then `put`
  and `patch` events as it changes, and `keep-alive` events.
Not implemented: POST (push ids; dualwrite never uses it), rules, auth, priorities.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

KEEP_ALIVE_S = 30.0


def _parts(path: str) -> list[str]:
    return [p for p in path.strip("/").split("/") if p]


def _get(tree: Any, parts: list[str]) -> Any:
    for part in parts:
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _normalise(value: Any) -> Any:
    """Empty objects do not exist in the database; nulls delete."""
    if isinstance(value, dict):
        cleaned = {k: _normalise(v) for k, v in value.items()}
        cleaned = {k: v for k, v in cleaned.items() if v is not None}
        return cleaned or None
    return value


def _type_rank(value: Any) -> int:
    if value is None:
        return 0
    if value is False:
        return 1
    if value is True:
        return 2
    if isinstance(value, int | float):
        return 3
    if isinstance(value, str):
        return 4
    return 5


def _value_key(value: Any) -> tuple[int, Any]:
    rank = _type_rank(value)
    return (rank, value if rank in (3, 4) else 0)


def _key_key(key: str) -> tuple[int, Any]:
    # Keys that parse as 32-bit integers come first, in numeric order.
    if key.lstrip("-").isdigit() and -(2**31) <= int(key) < 2**31:
        return (0, int(key))
    return (1, key)


class Database:
    def __init__(self) -> None:
        self.root: Any = None
        self.listeners: list[tuple[list[str], asyncio.Queue[tuple[str, str, Any]]]] = []

    def read(self, parts: list[str]) -> Any:
        return copy.deepcopy(_get(self.root, parts))

    def write(self, parts: list[str], value: Any) -> None:
        value = _normalise(value)
        if not parts:
            self.root = value
        else:
            if not isinstance(self.root, dict):
                self.root = {}
            node = self.root
            for part in parts[:-1]:
                if not isinstance(node.get(part), dict):
                    node[part] = {}
                node = node[part]
            if value is None:
                node.pop(parts[-1], None)
            else:
                node[parts[-1]] = value
            self.root = _normalise(self.root)

    def drop_streams(self) -> None:
        """End every open event stream, as a network failure or server restart would."""
        for _, queue in self.listeners:
            queue.put_nowait(("drop", "/", None))

    def notify_put(self, parts: list[str]) -> None:
        for where, queue in self.listeners:
            if parts[: len(where)] == where:
                relative = "/" + "/".join(parts[len(where) :])
                queue.put_nowait(("put", relative, self.read(parts)))
            elif where[: len(parts)] == parts:
                queue.put_nowait(("put", "/", self.read(where)))

    def notify_patch(self, parts: list[str], children: dict[str, Any]) -> None:
        for where, queue in self.listeners:
            if parts[: len(where)] == where:
                relative = "/" + "/".join(parts[len(where) :])
                data = {k: self.read(parts + _parts(k)) for k in children}
                queue.put_nowait(("patch", relative, data))
            elif where[: len(parts)] == parts:
                queue.put_nowait(("put", "/", self.read(where)))


def _etag(value: Any) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _query(value: Any, params: dict[str, str]) -> Any:
    if "shallow" in params and params["shallow"] == "true":
        if isinstance(value, dict):
            return {k: True if isinstance(v, dict) else v for k, v in value.items()}
        return value
    if "orderBy" not in params or not isinstance(value, dict):
        return value
    order_by = json.loads(params["orderBy"])

    def sort_key(item: tuple[str, Any]) -> tuple[Any, ...]:
        key, child = item
        if order_by == "$key":
            return (_key_key(key),)
        target = child if order_by == "$value" else _get(child, _parts(order_by))
        return (_value_key(target), _key_key(key))

    def bound(item: tuple[str, Any]) -> tuple[Any, ...]:
        key, child = item
        if order_by == "$key":
            return (_key_key(key),)
        target = child if order_by == "$value" else _get(child, _parts(order_by))
        return (_value_key(target),)

    def as_bound(raw: str) -> tuple[Any, ...]:
        given = json.loads(raw)
        return (_key_key(str(given)),) if order_by == "$key" else (_value_key(given),)

    items = sorted(value.items(), key=sort_key)
    if "equalTo" in params:
        items = [i for i in items if bound(i) == as_bound(params["equalTo"])]
    if "startAt" in params:
        items = [i for i in items if bound(i) >= as_bound(params["startAt"])]
    if "endAt" in params:
        items = [i for i in items if bound(i) <= as_bound(params["endAt"])]
    if "limitToFirst" in params:
        items = items[: int(params["limitToFirst"])]
    if "limitToLast" in params:
        items = items[-int(params["limitToLast"]) :] if int(params["limitToLast"]) else []
    return dict(items)


def create_app() -> Starlette:
    db = Database()

    async def node(request: Request) -> Response:
        path = request.path_params["path"]
        if not path.endswith(".json"):
            return JSONResponse({"error": "paths end with .json"}, 404)
        parts = _parts(path[: -len(".json")])
        params = dict(request.query_params)
        silent = params.get("print") == "silent"
        if request.method == "GET":
            if request.headers.get("accept") == "text/event-stream":
                return StreamingResponse(stream(parts), media_type="text/event-stream")
            value = _query(db.read(parts), params)
            headers = {}
            if request.headers.get("x-firebase-etag") == "true":
                headers["ETag"] = _etag(db.read(parts))
            return JSONResponse(value, headers=headers)
        body = await request.body()
        payload = json.loads(body) if body else None
        if request.method == "PUT":
            expected = request.headers.get("if-match")
            current = db.read(parts)
            if expected is not None and expected != _etag(current):
                return JSONResponse(current, 412, headers={"ETag": _etag(current)})
            db.write(parts, payload)
            db.notify_put(parts)
            if silent:
                return Response(status_code=204)
            return JSONResponse(db.read(parts), headers={"ETag": _etag(db.read(parts))})
        if request.method == "PATCH":
            if not isinstance(payload, dict):
                return JSONResponse({"error": "PATCH takes an object"}, 400)
            for key, value in payload.items():
                db.write(parts + _parts(key), value)
            db.notify_patch(parts, payload)
            return Response(status_code=204) if silent else JSONResponse(payload)
        if request.method == "DELETE":
            db.write(parts, None)
            db.notify_put(parts)
            return JSONResponse(None)
        return JSONResponse({"error": "method not supported"}, 405)

    async def stream(parts: list[str]) -> AsyncIterator[str]:
        queue: asyncio.Queue[tuple[str, str, Any]] = asyncio.Queue()
        db.listeners.append((parts, queue))
        try:
            yield _event("put", {"path": "/", "data": db.read(parts)})
            while True:
                try:
                    kind, path, data = await asyncio.wait_for(queue.get(), KEEP_ALIVE_S)
                except TimeoutError:
                    yield "event: keep-alive\ndata: null\n\n"
                    continue
                if kind == "drop":
                    return
                yield _event(kind, {"path": path, "data": data})
        finally:
            db.listeners.remove((parts, queue))

    app = Starlette(
        routes=[Route("/{path:path}", node, methods=["GET", "PUT", "PATCH", "DELETE", "POST"])]
    )
    app.state.db = db
    return app


def _event(kind: str, payload: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n"
