"""The chat server: `create_app` builds the ASGI app, `dualwrite serve` runs it."""

from dualwrite.server.app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app"]
