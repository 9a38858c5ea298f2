from __future__ import annotations

import pytest

from dualwrite.errors import BadSetting
from dualwrite.redact import redact_url
from dualwrite.settings import ServerSettings, Settings


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


@pytest.mark.parametrize(
    "environ",
    [
        {"DUALWRITE_REALTIME_TIMEOUT_S": "nan"},
        {"DUALWRITE_RECONCILE_GRACE_S": "1e400"},
        {"DUALWRITE_GROUP_COMMIT": "maybe"},
        {"DUALWRITE_MIGRATE_ON_START": "xx"},
    ],
)
def test_non_finite_numbers_and_unclear_switches_are_refused(environ: dict[str, str]) -> None:
    with pytest.raises(BadSetting) as error:
        Settings.from_env(environ)
    assert next(iter(environ)) in str(error.value)


def test_an_empty_variable_means_the_default() -> None:
    settings = Settings.from_env({"DUALWRITE_QUEUE_PATH": "", "DUALWRITE_REALTIME_URL": ""})
    assert (settings.queue_path, settings.realtime_url) == (
        Settings().queue_path,
        Settings().realtime_url,
    )


def test_server_settings_are_read_and_checked_like_settings() -> None:
    server = ServerSettings.from_env(
        {
            "DUALWRITE_TOKEN_SECRET": "s" * 32,
            "DUALWRITE_SEND_RATE_PER_S": "2.5",
            "DUALWRITE_FIREBASE_PROJECT": "demo",
            "DUALWRITE_DEV_SIGN_IN": "on",
        }
    )
    assert server.send_rate_per_s == 2.5
    assert server.firebase_project == "demo" and server.dev_sign_in
    assert not ServerSettings().dev_sign_in  # only when asked for


@pytest.mark.parametrize(
    "environ",
    [
        # Empty is refused, never read as "no secret": that would turn dev sign-in on.
        {"DUALWRITE_TOKEN_SECRET": ""},
        {"DUALWRITE_TOKEN_SECRET": "short"},
        {"DUALWRITE_SEND_RATE_PER_S": "nan"},
        {"DUALWRITE_SEND_RATE_PER_S": "-1"},
        {"DUALWRITE_DEV_SIGN_IN": "maybe"},
        {"DUALWRITE_MAX_HISTORY": "0"},
    ],
)
def test_bad_server_settings_name_their_variable(environ: dict[str, str]) -> None:
    with pytest.raises(BadSetting) as error:
        ServerSettings.from_env(environ)
    assert next(iter(environ)) in str(error.value)
