"""The chat server: `dualwrite.server.app.create_app` builds the ASGI app, `dualwrite serve`
runs it. Nothing is imported here, so `dualwrite.server.auth` loads without Starlette."""
