"""One firebase-admin app per backend instance, named so that several can coexist."""

from __future__ import annotations

import uuid
from typing import Any

import firebase_admin
from firebase_admin import credentials


def initialize(options: dict[str, Any], *, emulated: bool) -> firebase_admin.App:
    """A fresh app with ``options``; Google's default credentials unless talking to an emulator."""
    credential: Any = None if emulated else credentials.ApplicationDefault()
    return firebase_admin.initialize_app(
        credential, options, name=f"dualwrite-{uuid.uuid4().hex[:12]}"
    )


def delete(app: firebase_admin.App | None) -> None:
    if app is not None:
        firebase_admin.delete_app(app)
