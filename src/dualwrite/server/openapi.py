"""The OpenAPI document the server serves at /openapi.json: the HTTP contract, in one place."""

from __future__ import annotations

from typing import Any

_ERROR = {
    "type": "object",
    "properties": {"error": {"type": "string"}, "field": {"type": "string"}},
    "required": ["error"],
}
_MESSAGE = {
    "type": "object",
    "properties": {
        "messageId": {"type": "string"},
        "workspaceId": {"type": "string"},
        "channelId": {"type": "string"},
        "userId": {"type": "string"},
        "userName": {"type": "string"},
        "text": {"type": "string"},
        "timestamp": {"type": "integer", "description": "ms since the epoch"},
        "saved": {"type": "boolean", "description": "in the permanent store yet"},
    },
}
_PATH_ID = {"type": "string", "minLength": 1, "maxLength": 768}


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _params(*names: str) -> list[dict[str, Any]]:
    return [{"name": n, "in": "path", "required": True, "schema": _PATH_ID} for n in names]


_COMMON = {
    "401": _error("missing, forged or expired token"),
    "403": _error("the channel is in another workspace"),
    "422": _error("bad input; `field` names it"),
    "429": _error("the user is over a rate limit; see Retry-After"),
}

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "dualwrite",
        "version": "0.1.0",
        "description": "Chat messages: realtime tier first, permanent store second.",
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        "schemas": {"Error": _ERROR, "Message": _MESSAGE},
    },
    "security": [{"bearer": []}],
    "paths": {
        "/api/workspaces/{ws}/channels/{ch}/messages": {
            "parameters": _params("ws", "ch"),
            "post": {
                "summary": "Send a message",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "text": {"type": "string", "minLength": 1},
                                    "clientMessageId": {
                                        "type": "string",
                                        "description": "idempotency key: a repeat returns the "
                                        "first send's id and never makes a second message",
                                    },
                                },
                                "required": ["text"],
                            }
                        }
                    },
                },
                "responses": {
                    "201": {"description": "delivered and saved"},
                    "202": {"description": "delivered, not saved yet (warning; queued)"},
                    "400": _error("the body is not a JSON object"),
                    "413": _error("text or body too long"),
                    "503": _error("Message failed to send. Retry?"),
                    **_COMMON,
                },
            },
            "get": {
                "summary": "History, newest first (both tiers merged, each message once)",
                "parameters": [
                    {"name": "before", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 200},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "a page; pass nextBefore as before for the next",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "messages": {
                                            "type": "array",
                                            "items": {"$ref": "#/components/schemas/Message"},
                                        },
                                        "nextBefore": {"type": "string", "nullable": True},
                                    },
                                }
                            }
                        },
                    },
                    "503": _error("a tier did not answer; try again"),
                    **_COMMON,
                },
            },
        },
        "/api/workspaces/{ws}/channels/{ch}/messages/{id}/persist": {
            "parameters": _params("ws", "ch", "id"),
            "post": {
                "summary": "Manual retry of the permanent write (same id)",
                "responses": {
                    "200": {"description": "saved"},
                    "202": {"description": "still not saved; queued"},
                    "404": _error("in neither tier (expired?)"),
                    **_COMMON,
                },
            },
        },
        "/api/auth/renew": {
            "post": {
                "summary": "A fresh token for the caller (renew before `exp`)",
                "responses": {
                    "200": {
                        "description": "the new token and its expiry",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "token": {"type": "string"},
                                        "expiresAt": {
                                            "type": "integer",
                                            "description": "ms since the epoch",
                                        },
                                    },
                                }
                            }
                        },
                    },
                    "401": _COMMON["401"],
                    "429": _COMMON["429"],
                },
            }
        },
        "/api/workspaces/{ws}/channels": {
            "parameters": _params("ws"),
            "get": {
                "summary": "The workspace's channels: those created and those holding messages",
                "responses": {
                    "200": {
                        "description": "channel ids, sorted",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "channels": {"type": "array", "items": {"type": "string"}}
                                    },
                                }
                            }
                        },
                    },
                    "503": _error("the store did not answer; try again"),
                    **_COMMON,
                },
            },
            "post": {
                "summary": "Create a channel (announced live to the workspace's sockets)",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {"channelId": {"type": "string", "minLength": 1}},
                                "required": ["channelId"],
                            }
                        }
                    },
                },
                "responses": {
                    "201": {"description": "created (or existed already)"},
                    "400": _error("the body is not a JSON object"),
                    "429": _error("the user creates too fast; see Retry-After"),
                    "413": _error("body too long"),
                    "503": _error("the store did not answer; try again"),
                    **_COMMON,
                },
            },
        },
        "/api/queue": {
            "get": {
                "summary": "The caller's messages waiting to be saved (on this server)",
                "responses": {"200": {"description": "pending writes"}, "401": _COMMON["401"]},
            }
        },
    },
}
