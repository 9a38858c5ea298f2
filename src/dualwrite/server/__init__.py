"""The chat server: `create_app` builds the ASGI app, `dualwrite serve` runs it."""

from dualwrite.server.app import create_app

__all__ = ["create_app"]
