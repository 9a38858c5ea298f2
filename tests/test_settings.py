from __future__ import annotations

import pytest

from dualwrite.errors import BadSetting
from dualwrite.redact import redact_url
from dualwrite.settings import Settings


def test_environment_variables_configure_every_field() -> None:
    settings = Settings.from_env(
        {
            "DUALWRITE_REALTIME_URL": "redis://127.0.0.1:6379/0",
            "DUALWRITE_PERMANENT_TIMEOUT_S": "1.5",
            "DUALWRITE_MAX_TEXT_CHARS": "100",
            "DUALWRITE_GROUP_COMMIT": "0",
            "SENTRY_DSN": "https://key@sentry.invalid/1",
        }
    )
    assert settings.realtime_url == "redis://127.0.0.1:6379/0"
    assert settings.permanent_timeout_s == 1.5
    assert settings.max_text_chars == 100
    assert settings.group_commit is False
    assert settings.sentry_dsn == "https://key@sentry.invalid/1"
    assert Settings.from_env({}, store_url=None).store_url == Settings().store_url


@pytest.mark.parametrize(
    "environ",
    [
        {"DUALWRITE_PERMANENT_TIMEOUT_S": "soon"},
        {"DUALWRITE_REALTIME_TIMEOUT_S": "0"},
        {"DUALWRITE_MAX_TEXT_CHARS": "0"},
        {"DUALWRITE_FAULT_REALTIME": "1.5"},
    ],
)
def test_bad_values_name_their_variable(environ: dict[str, str]) -> None:
    with pytest.raises(BadSetting) as error:
        Settings.from_env(environ)
    name = next(iter(environ)).removeprefix("DUALWRITE_").lower()
    assert name in str(error.value).lower()


def test_passwords_are_not_printed() -> None:
    assert redact_url("postgresql://u:secret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"
