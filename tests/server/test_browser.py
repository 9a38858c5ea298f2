"""The chat page in real headless Chromium (Debian's), driven by Playwright."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Dialog, Page, expect, sync_playwright

from tests.server.conftest import Api
from tests.support.servers import serve_process

pytestmark = pytest.mark.browser
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.fail("Chromium is missing: bash scripts/setup installs it")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def signed_in(browser: Browser, api: Api, user: str = "u1", name: str = "Ada") -> Page:
    page = browser.new_context().new_page()
    page.goto(str(api.client.base_url))
    page.fill("input[name=userId]", user)
    page.fill("input[name=userName]", name)
    page.fill("input[name=workspaceId]", "acme")
    page.click("text=Sign in")
    expect(page.get_by_test_id("live-state")).to_have_text("live")
    return page


def send(page: Page, text: str) -> None:
    page.get_by_test_id("composer").fill(text)
    page.get_by_test_id("send").click()


def messages(page: Page) -> list[str]:
    return page.locator("[data-testid=message] .text").all_inner_texts()


def stored_texts(api: Api) -> list[str]:
    response = api.client.get("/api/workspaces/acme/channels/general/messages", headers=api.auth())
    return [m["text"] for m in response.json()["messages"] if m["saved"]]


def test_send_and_see_the_message(browser: Browser, api: Api) -> None:
    page = signed_in(browser, api)
    send(page, "hello from the page")
    item = page.get_by_test_id("message").filter(has_text="hello from the page")
    expect(item).to_have_count(1)
    expect(item).not_to_have_class("sending")
    assert stored_texts(api) == ["hello from the page"]


def test_realtime_failure_rolls_back_and_retry_delivers_once(browser: Browser, api: Api) -> None:
    page = signed_in(browser, api)
    api.realtime_faults.operations = frozenset({"write"})
    api.realtime_faults.fail()
    send(page, "try again")
    banner = page.get_by_test_id("send-failed")
    expect(banner).to_be_visible()
    expect(banner).to_contain_text("Message failed to send. Retry?")
    expect(page.get_by_test_id("message")).to_have_count(0)  # rolled back
    api.realtime_faults.heal()
    page.get_by_test_id("send-failed-retry").click()
    expect(banner).to_be_hidden()
    expect(page.get_by_test_id("message").filter(has_text="try again")).to_have_count(1)
    assert stored_texts(api) == ["try again"]


def test_permanent_failure_warns_and_retry_clears_it(browser: Browser, api: Api) -> None:
    page = signed_in(browser, api)
    api.store_faults.operations = frozenset({"save"})
    api.store_faults.fail()
    send(page, "keep me")
    banner = page.get_by_test_id("not-saved")
    expect(banner).to_be_visible()
    expect(banner).to_contain_text("Message sent but not saved. It will disappear in 1 hour.")
    expect(page.get_by_test_id("message").filter(has_text="keep me")).to_have_count(1)
    page.get_by_test_id("not-saved-retry").click()  # store still down: the banner stays
    page.wait_for_timeout(300)
    expect(banner).to_be_visible()
    api.store_faults.heal()
    page.get_by_test_id("not-saved-retry").click()
    expect(banner).to_be_hidden()
    assert stored_texts(api) == ["keep me"]


def test_two_people_see_each_others_messages_live(browser: Browser, api: Api) -> None:
    ada = signed_in(browser, api)
    bob = signed_in(browser, api, "u2", "Bob")
    send(ada, "hi Bob")
    expect(bob.get_by_test_id("message").filter(has_text="hi Bob")).to_have_count(1)
    send(bob, "hi Ada")
    expect(ada.get_by_test_id("message").filter(has_text="hi Ada")).to_have_count(1)
    assert messages(ada) == ["hi Bob", "hi Ada"]
    assert messages(bob) == ["hi Bob", "hi Ada"]


def test_message_text_is_shown_as_text_never_run_as_html(browser: Browser, api: Api) -> None:
    page = signed_in(browser, api)
    dialogs: list[str] = []

    def record(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", record)
    payload = "<img src=x onerror=alert(1)>"
    send(page, payload)
    expect(page.get_by_test_id("message").filter(has_text=payload)).to_have_count(1)
    page.reload()
    expect(page.get_by_test_id("message").filter(has_text=payload)).to_have_count(1)
    page.wait_for_timeout(300)
    assert dialogs == []
    assert page.locator("#messages img").count() == 0


def test_the_readme_command_gives_a_page_a_newcomer_can_sign_in_to(
    browser: Browser, tmp_path: Path
) -> None:
    # README, Set up and run: `dualwrite serve --dev-sign-in`, no secret configured.
    with serve_process(tmp_path, "--dev-sign-in", env={"DUALWRITE_TOKEN_SECRET": None}) as base:
        page = browser.new_context().new_page()
        console: list[str] = []
        page.on("console", lambda message: console.append(message.text))
        page.goto(base)
        page.fill("input[name=userId]", "newcomer")
        page.fill("input[name=userName]", "Newcomer")
        page.fill("input[name=workspaceId]", "acme")
        page.click("text=Sign in")
        expect(page.get_by_test_id("live-state")).to_have_text("live")
        send(page, "hello from a newcomer")
        sent = page.get_by_test_id("message").filter(has_text="hello from a newcomer")
        expect(sent).to_have_count(1)
        assert not [c for c in console if "Content Security Policy" in c], console
