"""The chat page in real headless Chromium (Debian's), driven by Playwright.

Every page here runs under `Content-Security-Policy: default-src 'self'` (added to the document
by the test if the server does not send it), and a test fails on any CSP violation, uncaught
script error or `alert()`. Screenshots at 1280 and 390 px go to `DUALWRITE_SCREENSHOTS` (a
temporary folder by default); the 1280 px one is the README's docs/page.png.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest
from playwright.sync_api import (
    Browser,
    ConsoleMessage,
    Dialog,
    Error,
    Page,
    Route,
    WebSocketRoute,
    expect,
    sync_playwright,
)

from dualwrite.model import User
from dualwrite.server.auth import Identity
from dualwrite.settings import ServerSettings
from dualwrite.tools.serve_process import free_port
from tests.server.conftest import SECRET, Api, _api
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
    # A document the test fulfils (to add its CSP) has no address space of its own; without
    # this, Chromium's local-network checks refuse its socket to 127.0.0.1.
    "--disable-features=LocalNetworkAccessChecks",
]
CSP = "default-src 'self'"
GENERAL = "/api/workspaces/acme/channels/general/messages"


@dataclass
class Problems:
    """What a page must never do: break its CSP, throw, or pop up a dialog."""

    found: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.fail("Chromium is missing: bash scripts/setup installs it")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def problems() -> Iterator[Problems]:
    found = Problems()
    yield found
    assert found.found == []


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("DUALWRITE_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _with_csp(route: Route) -> None:
    if route.request.resource_type != "document":
        route.continue_()
        return
    response = route.fetch()
    route.fulfill(response=response, headers={**response.headers, "content-security-policy": CSP})


def open_page(browser: Browser, base: str, problems: Problems, width: int = 1280) -> Page:
    context = browser.new_context(viewport={"width": width, "height": 800})
    context.route("**/*", _with_csp)
    page = context.new_page()

    def console(message: ConsoleMessage) -> None:
        if "Content Security Policy" in message.text:
            problems.found.append(f"CSP: {message.text}")

    def dialog(box: Dialog) -> None:
        problems.found.append(f"dialog: {box.message}")
        box.dismiss()

    page.on("console", console)
    page.on("pageerror", lambda error: problems.found.append(f"script error: {error}"))
    page.on("dialog", dialog)
    page.goto(base)
    return page


def sign_in(page: Page, user: str = "u1", name: str = "Ada") -> None:
    page.fill("input[name=userId]", user)
    page.fill("input[name=userName]", name)
    page.fill("input[name=workspaceId]", "acme")
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page.get_by_test_id("live-state")).to_have_text("live")


def signed_in(
    browser: Browser,
    api: Api,
    problems: Problems,
    user: str = "u1",
    name: str = "Ada",
    width: int = 1280,
) -> Page:
    page = open_page(browser, str(api.client.base_url), problems, width)
    sign_in(page, user, name)
    return page


def send(page: Page, text: str) -> None:
    page.get_by_test_id("composer").fill(text)
    page.get_by_test_id("send").click()


def texts(page: Page) -> list[str]:
    return page.locator("[data-testid=message] .text").all_inner_texts()


def message(page: Page, text: str):  # type: ignore[no-untyped-def]
    return page.get_by_test_id("message").filter(has_text=text)


def stored_texts(api: Api, channel: str = "general") -> list[str]:
    response = api.client.get(
        f"/api/workspaces/acme/channels/{channel}/messages",
        headers=api.auth(),
        params={"limit": 200},
    )
    return [m["text"] for m in response.json()["messages"] if m["saved"]]


# ---- the basics --------------------------------------------------------------------------


def test_send_and_see_the_message(browser: Browser, api: Api, problems: Problems) -> None:
    page = signed_in(browser, api, problems)
    send(page, "hello from the page")
    expect(message(page, "hello from the page")).to_have_count(1)
    expect(message(page, "hello from the page")).not_to_have_class(re.compile(r"\bsending\b"))
    assert stored_texts(api) == ["hello from the page"]
    # The token never travels in a URL: the socket sends it as its first frame.
    assert "token=" not in page.evaluate("performance.getEntries().map(e => e.name).join(' ')")


def test_two_people_see_each_others_messages_live(
    browser: Browser, api: Api, problems: Problems
) -> None:
    ada = signed_in(browser, api, problems)
    bob = signed_in(browser, api, problems, "u2", "Bob")
    send(ada, "hi Bob")
    expect(message(bob, "hi Bob")).to_have_count(1)
    send(bob, "hi Ada")
    expect(message(ada, "hi Ada")).to_have_count(1)
    assert texts(ada) == ["hi Bob", "hi Ada"]
    assert texts(bob) == ["hi Bob", "hi Ada"]


def test_message_text_is_shown_as_text_never_run_as_html(
    browser: Browser, api: Api, problems: Problems
) -> None:
    page = signed_in(browser, api, problems)
    payload = "<img src=x onerror=alert(1)>"
    send(page, payload)
    expect(message(page, payload)).to_have_count(1)
    page.reload()
    expect(message(page, payload)).to_have_count(1)
    assert page.locator("#messages img").count() == 0


# ---- no text is ever lost ----------------------------------------------------------------


def test_a_failed_send_stays_marked_not_sent_with_retry_and_delete(
    browser: Browser, api: Api, problems: Problems
) -> None:
    page = signed_in(browser, api, problems)
    api.realtime_faults.operations = frozenset({"write"})
    api.realtime_faults.fail()
    send(page, "first try")
    send(page, "second try")
    banner = page.get_by_test_id("send-failed")
    expect(banner).to_contain_text("Message failed to send. Retry?")
    # Both stay, each with its own Retry and Delete; nothing was sent.
    expect(page.locator("li.failed")).to_have_count(2)
    expect(message(page, "first try")).to_contain_text("Not sent")
    assert stored_texts(api) == []
    # They survive a reload.
    page.get_by_test_id("composer").fill("a draft")
    page.reload()
    expect(page.locator("li.failed")).to_have_count(2)
    expect(page.get_by_test_id("composer")).to_have_value("a draft")
    api.realtime_faults.heal()
    # By keyboard: the focus stays on the list while it is rebuilt.
    message(page, "second try").get_by_test_id("message-retry").focus()
    page.keyboard.press("Enter")
    expect(message(page, "second try")).not_to_have_class(re.compile(r"\bfailed\b"))
    expect(page.get_by_test_id("composer")).to_be_focused()  # not lost to the page
    message(page, "first try").get_by_test_id("message-delete").click()
    expect(message(page, "first try")).to_have_count(0)
    expect(banner).to_be_hidden()
    assert stored_texts(api) == ["second try"]


def test_a_send_whose_answer_was_lost_is_retried_without_a_duplicate(
    browser: Browser, api: Api, problems: Problems
) -> None:
    page = signed_in(browser, api, problems)
    posts: list[str] = []

    def lose_the_first_answer(route: Route) -> None:
        if route.request.method != "POST":
            route.continue_()
            return
        body = route.request.post_data_json or {}
        posts.append(body["clientMessageId"])
        if len(posts) == 1:
            route.fetch()  # the server takes the message...
            route.abort()  # ...and its answer never arrives
        else:
            route.continue_()

    page.route("**/channels/general/messages", lose_the_first_answer)
    send(page, "once only")
    # The message came back over the socket: the page sends it again with the same
    # clientMessageId (or the person clicks Retry), and the server finds the first send.
    expect(page.locator("li.outbox")).to_have_count(0)
    expect(page.get_by_test_id("send-failed")).to_be_hidden()
    expect(message(page, "once only")).to_have_count(1)
    assert len(posts) == 2 and posts[0] == posts[1]
    page.reload()
    expect(message(page, "once only")).to_have_count(1)
    assert stored_texts(api) == ["once only"]


@pytest.fixture
def slow_api(tmp_path: Path) -> Iterator[Api]:
    """A server that takes 5 sends a second per user (bursts of 10)."""
    config = ServerSettings(token_secret=SECRET, dev_sign_in=True, send_rate_per_s=5)
    yield from _api(tmp_path, config)


def test_thirty_rapid_sends_over_the_rate_limit_all_land_exactly_once(
    browser: Browser, slow_api: Api, problems: Problems
) -> None:
    page = signed_in(browser, slow_api, problems)
    sent = [f"rapid {i:02d}" for i in range(30)]
    # As fast as a person pasting and pressing Enter could: all thirty within a few ms.
    page.evaluate(
        """(texts) => { for (const text of texts) {
             document.getElementById("text").value = text;
             document.getElementById("composer").requestSubmit();
           } }""",
        sent,
    )
    # Some wait for the rate limit, shown inline, and go out by themselves.
    expect(page.locator("li.waiting").first).to_contain_text("goes out by itself")
    expect(page.locator("li.outbox")).to_have_count(0, timeout=30_000)
    assert texts(page) == sent
    assert sorted(stored_texts(slow_api)) == sent
    page.reload()
    expect(page.get_by_test_id("message")).to_have_count(30)


# ---- 401 anywhere ------------------------------------------------------------------------


def test_serve_restarted_with_a_new_secret_returns_to_sign_in_keeping_texts(
    browser: Browser, tmp_path: Path, problems: Problems
) -> None:
    port = free_port()
    first = ServerSettings(token_secret="first-secret-" + "a" * 40, dev_sign_in=True)
    second = ServerSettings(token_secret="second-secret-" + "b" * 40, dev_sign_in=True)
    servers = cast(Generator[Api, None, None], _api(tmp_path, first, port=port))
    api = next(servers)
    page = signed_in(browser, api, problems)
    send(page, "before the restart")
    expect(message(page, "before the restart")).not_to_have_class(re.compile(r"\bsending\b"))
    servers.close()  # the server stops
    send(page, "while it is down")
    expect(message(page, "while it is down")).to_contain_text("Not sent")
    page.get_by_test_id("composer").fill("half-typed")
    restarted = cast(Generator[Api, None, None], _api(tmp_path, second, port=port))
    next(restarted)
    try:
        # The socket reconnects with a token the new secret refuses: back to sign-in.
        expect(page.get_by_test_id("sign-in")).to_be_visible(timeout=20_000)
        expect(page.get_by_test_id("sign-in-note")).to_contain_text("Sign in again")
        sign_in(page)
        expect(page.get_by_test_id("composer")).to_have_value("half-typed")
        expect(message(page, "while it is down")).to_contain_text("Not sent")
        message(page, "while it is down").get_by_test_id("message-retry").click()
        expect(page.locator("li.outbox")).to_have_count(0)
        assert texts(page) == ["before the restart", "while it is down"]
    finally:
        restarted.close()


def test_sign_out_returns_to_sign_in(browser: Browser, api: Api, problems: Problems) -> None:
    page = signed_in(browser, api, problems)
    page.get_by_test_id("sign-out").click()
    expect(page.get_by_test_id("sign-in")).to_be_visible()
    page.reload()
    expect(page.get_by_test_id("sign-in")).to_be_visible()


# ---- honest states -----------------------------------------------------------------------


def test_a_failed_history_load_says_so_with_retry(
    browser: Browser, api: Api, problems: Problems
) -> None:
    api.client.post(GENERAL, headers=api.auth(), json={"text": "already here"})
    api.store_faults.operations = frozenset({"history"})
    api.store_faults.fail()
    page = signed_in(browser, api, problems)
    expect(page.get_by_test_id("history-error")).to_contain_text("Could not load")
    api.store_faults.heal()
    page.get_by_test_id("history-retry").click()
    expect(page.get_by_test_id("history-error")).to_be_hidden()
    expect(message(page, "already here")).to_have_count(1)


def test_the_yellow_retry_shows_progress_and_its_result(
    browser: Browser, api: Api, problems: Problems
) -> None:
    page = signed_in(browser, api, problems)
    api.store_faults.operations = frozenset({"save"})
    api.store_faults.fail()
    send(page, "keep me")
    banner = page.get_by_test_id("not-saved")
    expect(banner).to_contain_text("Message sent but not saved. It will disappear in 1 hour.")
    expect(message(page, "keep me")).to_contain_text("Not saved yet")
    page.get_by_test_id("not-saved-retry").click()  # the store still fails
    expect(page.get_by_test_id("not-saved-status")).to_contain_text("Still not saved")
    expect(banner).to_be_visible()
    api.store_faults.heal()
    page.get_by_test_id("not-saved-retry").click()
    expect(page.get_by_test_id("not-saved-status")).to_have_text("Saved.")
    expect(message(page, "keep me")).not_to_contain_text("Not saved yet")
    expect(banner).to_be_hidden(timeout=10_000)
    assert stored_texts(api) == ["keep me"]


@pytest.fixture
def retrying_api(tmp_path: Path) -> Iterator[Api]:
    """A server whose background retrier runs, and retries within a tenth of a second."""
    config = ServerSettings(token_secret=SECRET, dev_sign_in=True)
    yield from _api(tmp_path, config, background=True, retry_base_s=0.05, retry_poll_s=0.05)


def test_a_stalled_store_that_recovers_clears_not_saved_without_a_reload(
    browser: Browser, retrying_api: Api, problems: Problems
) -> None:
    api = retrying_api
    ada = signed_in(browser, api, problems)
    api.store_faults.operations = frozenset({"save", "save_many"})
    api.store_faults.hang()  # answers nothing, closes nothing
    send(ada, "stalled")
    expect(ada.get_by_test_id("not-saved")).to_be_visible()
    expect(message(ada, "stalled")).to_contain_text("Not saved yet")
    api.store_faults.heal()
    # The background retrier saves it; the server says so over the socket.
    expect(message(ada, "stalled")).not_to_contain_text("Not saved yet", timeout=10_000)
    expect(ada.get_by_test_id("not-saved")).to_be_hidden()
    assert stored_texts(api) == ["stalled"]


# ---- channels are data -------------------------------------------------------------------


def test_two_users_see_a_new_channel_appear_and_it_survives_a_reload(
    browser: Browser, api: Api, problems: Problems
) -> None:
    ada = signed_in(browser, api, problems)
    bob = signed_in(browser, api, problems, "u2", "Bob")
    ada.get_by_test_id("composer").fill("a draft for general")
    ada.fill("#new-channel", "design")
    ada.press("#new-channel", "Enter")
    expect(ada.locator("#channel-name")).to_have_text("# design")
    assert ada.url.endswith("#/acme/design")
    expect(ada.get_by_test_id("composer")).to_have_value("")  # drafts are per channel
    expect(bob.get_by_test_id("channels")).to_contain_text("# design")
    send(ada, "in design")
    ada.reload()
    expect(ada.locator("#channel-name")).to_have_text("# design")  # the URL keeps the channel
    expect(message(ada, "in design")).to_have_count(1)
    bob.reload()
    expect(bob.get_by_test_id("channels")).to_contain_text("# design")
    bob.get_by_role("button", name="# design").click()
    expect(message(bob, "in design")).to_have_count(1)
    ada.get_by_role("button", name="# general").click()
    expect(ada.get_by_test_id("composer")).to_have_value("a draft for general")


# ---- reading -----------------------------------------------------------------------------


def test_older_messages_load_by_scrolling_up_and_new_ones_are_marked(
    browser: Browser, api: Api, problems: Problems
) -> None:
    for i in range(120):  # twelve people, ten each: within the rate limit
        user = f"p{i % 12}"
        headers = api.auth(user=user, name=f"Person {i % 12}")
        api.client.post(GENERAL, headers=headers, json={"text": f"old {i:03d}"})
    page = signed_in(browser, api, problems)
    expect(message(page, "old 119")).to_have_count(1)
    assert page.get_by_test_id("message").count() < 120
    scroller = page.get_by_test_id("scroller")
    for _ in range(10):
        scroller.evaluate("element => { element.scrollTop = 0 }")
        if page.get_by_test_id("message").count() == 120:
            break
        page.wait_for_timeout(200)
    expect(page.get_by_test_id("message")).to_have_count(120)
    expect(page.get_by_test_id("history-state")).to_have_text(
        "This is the beginning of the channel."
    )
    assert texts(page) == [f"old {i:03d}" for i in range(120)]
    # Scrolled up, a new message is marked instead of pulling the view down.
    scroller.evaluate("element => { element.scrollTop = 0 }")
    api.client.post(GENERAL, headers=api.auth(user="u2", name="Bob"), json={"text": "fresh"})
    expect(page.get_by_test_id("new-messages")).to_be_visible()
    expect(page.get_by_test_id("unread-marker")).to_have_count(1)
    page.get_by_test_id("new-messages").click()
    expect(page.get_by_test_id("new-messages")).to_be_hidden()
    expect(message(page, "fresh")).to_be_in_viewport()


def test_timestamps_grouping_and_day_separators(
    browser: Browser, api: Api, problems: Problems
) -> None:
    page = signed_in(browser, api, problems)
    send(page, "one")
    send(page, "two")
    expect(message(page, "two")).not_to_have_class(re.compile(r"\boutbox\b"))
    api.client.post(GENERAL, headers=api.auth(user="u2", name="Bob"), json={"text": "three"})
    expect(message(page, "three")).to_have_count(1)
    expect(page.locator("li.day")).to_have_text(["Today"])
    first, second, third = (message(page, t) for t in ("one", "two", "three"))
    expect(first.locator(".author")).to_have_text("Ada")
    expect(second).to_have_class("message grouped")  # same author, a moment later
    expect(second.locator(".author")).to_have_count(0)
    expect(third.locator(".author")).to_have_text("Bob")
    stamp = first.locator("time")
    expect(stamp).to_have_text("just now")
    assert stamp.get_attribute("title")  # absolute on hover
    assert stamp.get_attribute("datetime")


# ---- layout, accessibility, screenshots --------------------------------------------------

CONTRAST = """() => {
  const lum = (rgb) => {
    const [r, g, b] = rgb.map((v) => {
      v /= 255;
      return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4;
    });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  const parse = (c) => (c.match(/[\\d.]+/g) || []).map(Number);
  const background = (el) => {
    for (; el; el = el.parentElement) {
      const c = parse(getComputedStyle(el).backgroundColor);
      if (c.length === 3 || (c.length === 4 && c[3] === 1)) return c.slice(0, 3);
    }
    return [255, 255, 255];
  };
  const bad = [];
  for (const el of document.querySelectorAll("body *")) {
    const own = [...el.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim());
    const hidden = getComputedStyle(el).visibility === "hidden";
    if (!own || !el.getClientRects().length || hidden) continue;
    const fg = lum(parse(getComputedStyle(el).color).slice(0, 3));
    const bg = lum(background(el));
    const ratio = (Math.max(fg, bg) + 0.05) / (Math.min(fg, bg) + 0.05);
    if (ratio < 4.5) bad.push(`${el.tagName}.${el.className}: ${ratio.toFixed(2)}`);
  }
  return bad;
}"""

UNNAMED_BUTTONS = """() => [...document.querySelectorAll("button")]
  .filter((b) => b.getClientRects().length && !(b.getAttribute("aria-label") || b.innerText.trim()))
  .map((b) => b.outerHTML)"""


def test_layout_accessibility_and_screenshots(
    browser: Browser, api: Api, problems: Problems, shots: Path
) -> None:
    bob = api.auth(user="u2", name="Bob")
    for text in ("Morning! The deploy went out 🚀", "Retro notes are in the doc 📝"):
        api.client.post(GENERAL, headers=bob, json={"text": text})
    page = signed_in(browser, api, problems)
    send(page, "Great, thanks 🙌 looking now")
    expect(message(page, "Great, thanks")).not_to_have_class(re.compile(r"\boutbox\b"))
    expect(message(page, "Great, thanks")).not_to_have_class(re.compile(r"\bsending\b"))
    api.store_faults.operations = frozenset({"save"})
    api.store_faults.fail()
    send(page, "This one waits for the store")
    expect(page.get_by_test_id("not-saved")).to_be_visible()
    expect(message(page, "waits for the store")).to_contain_text("Not saved yet")
    api.store_faults.heal()
    api.realtime_faults.operations = frozenset({"write"})
    api.realtime_faults.fail()
    send(page, "And this one did not go out")
    expect(page.get_by_test_id("send-failed")).to_be_visible()
    # Banners are announced; every button has a name; text holds AA contrast.
    live_region = page.locator("#banners[aria-live]")
    expect(live_region.get_by_test_id("send-failed")).to_have_count(1)
    expect(live_region.get_by_test_id("not-saved")).to_have_count(1)
    assert page.evaluate(UNNAMED_BUTTONS) == []
    assert page.evaluate(CONTRAST) == []
    page.screenshot(path=str(shots / "page-1280.png"))

    for width in (390, 360):
        narrow = signed_in(browser, api, problems, width=width)
        expect(message(narrow, "Great, thanks")).to_have_count(1)
        box = narrow.get_by_test_id("send").bounding_box()
        assert box is not None and box["x"] + box["width"] <= width
        assert narrow.evaluate("document.documentElement.scrollWidth") <= width
        assert narrow.evaluate(UNNAMED_BUTTONS) == []
        assert narrow.evaluate(CONTRAST) == []
        if width == 390:
            narrow.screenshot(path=str(shots / "page-390.png"))
        # The channel list opens over the room and a choice closes it.
        narrow.get_by_role("button", name="Channels").click()
        expect(narrow.locator("#sidebar")).to_be_in_viewport()
        narrow.get_by_role("button", name="# general").click()
        expect(narrow.locator("body")).not_to_have_class("nav-open")


def test_the_page_holds_no_inline_script_or_style(api: Api) -> None:
    html = api.client.get("/").text
    assert "style=" not in html and "<style" not in html
    assert "<script>" not in html and "onclick" not in html.lower()


def test_no_error_reaches_the_user_as_a_script_error(
    browser: Browser, api: Api, problems: Problems
) -> None:
    """Hostile input: channel names from the URL, long texts, and an unknown frame type."""
    page = signed_in(browser, api, problems)
    page.goto(str(api.client.base_url) + "/#/acme/%E2%9C%A8%20sparkles")
    expect(page.locator("#channel-name")).to_have_text("# ✨ sparkles")
    page.goto(str(api.client.base_url) + "/#/other-workspace/general")
    expect(page.locator("#channel-name")).to_have_text("# ✨ sparkles")  # stays in its own
    send(page, "x" * 5000)
    expect(page.locator("li.outbox")).to_have_count(0)
    with contextlib.suppress(Error):
        page.goto(str(api.client.base_url) + "/#/acme/%E0%A4%A")  # a broken escape
    expect(page.get_by_test_id("live-state")).to_have_text("live")


# ---- the WebSocket contract, against a scripted server ----------------------------------


def test_the_socket_follows_the_shared_contract(
    browser: Browser, api: Api, problems: Problems
) -> None:
    """First-frame token, `?cursor=` resume after 1013, history reload and a fresh socket
    after 4410, unknown frame types ignored, each message shown once."""
    page = open_page(browser, str(api.client.base_url), problems)
    sockets: list[tuple[str, list[str]]] = []
    events: list[str] = []  # "history" and "socket", in the order they happened
    page.on("request", lambda r: events.append("history") if "/messages?" in r.url else None)
    now = int(time.time() * 1000)

    def frame(message_id: str, text: str, cursor: str) -> str:
        return json.dumps(
            {
                "type": "message",
                "messageId": message_id,
                "workspaceId": "acme",
                "channelId": "general",
                "userId": "u9",
                "userName": "Script",
                "text": text,
                "timestamp": now,
                "ttl": now + 3_600_000,
                "cursor": cursor,
            }
        )

    def scripted(ws: WebSocketRoute) -> None:
        received: list[str] = []
        sockets.append((ws.url, received))
        events.append("socket")
        turn = len(sockets)

        def on_message(data: str | bytes) -> None:
            received.append(str(data))
            if turn == 1:
                ws.send(frame("-A0000000000000000001", "one", "c1"))
                ws.close(code=1013, reason="too slow")
            elif turn == 2:
                ws.send(json.dumps({"type": "typing", "userId": "u9"}))
                ws.send(frame("-A0000000000000000001", "one", "c1"))  # a repeat
                ws.send(frame("-A0000000000000000002", "two", "c2"))
                ws.close(code=4410, reason="cursor too old")

        ws.on_message(on_message)

    page.route_web_socket(re.compile(r".*/ws/workspaces/.*"), scripted)
    page.get_by_role("button", name="Sign in", exact=True).click()
    expect(page.get_by_test_id("message")).to_have_count(2)
    expect(page.get_by_test_id("live-state")).to_have_text("live")
    assert texts(page) == ["one", "two"]
    for _ in range(50):
        if len(sockets) >= 3:
            break
        page.wait_for_timeout(100)
    urls = [url.split("/channels/general", 1)[1] for url, _ in sockets]
    assert urls == ["", "?cursor=c1", ""]
    for _, received in sockets:
        assert json.loads(received[0]).keys() == {"token"}
    # History first; and after the 4410 (second socket), history again before the third.
    assert events[0] == "history"
    opened = [i for i, event in enumerate(events) if event == "socket"]
    assert "history" in events[opened[1] : opened[2]]


def test_the_token_is_renewed_before_it_expires(
    browser: Browser, api: Api, problems: Problems
) -> None:
    page = open_page(browser, str(api.client.base_url), problems)
    short = api.signer.mint(Identity(User("u1", "Ada"), "acme"), lifetime_s=4)
    fresh = api.token()
    renewals: list[str | None] = []
    page.route(
        "**/api/dev/token",
        lambda route: route.fulfill(json={"token": short}),
    )

    def renew(route: Route) -> None:
        renewals.append(route.request.headers.get("authorization"))
        route.fulfill(json={"token": fresh, "expiresAt": 0})

    page.route("**/api/auth/renew", renew)
    sign_in(page)
    page.wait_for_timeout(5000)  # past the first token's expiry
    assert renewals == [f"Bearer {short}"]
    send(page, "after renewal")
    expect(message(page, "after renewal")).not_to_have_class(re.compile(r"\boutbox\b"))
    expect(page.get_by_test_id("sign-in")).to_be_hidden()
    assert stored_texts(api) == ["after renewal"]


def test_the_readme_command_gives_a_page_a_newcomer_can_sign_in_to(
    browser: Browser, tmp_path: Path
) -> None:
    # README, Set up and run: `dualwrite serve --dev-sign-in`, no secret configured; the
    # server's own security headers (its CSP among them), not the tests'.
    with serve_process(tmp_path, "--dev-sign-in", env={"DUALWRITE_TOKEN_SECRET": None}) as base:
        page = browser.new_context().new_page()
        console: list[str] = []
        page.on("console", lambda message: console.append(message.text))
        page.goto(base)
        sign_in(page, "newcomer", "Newcomer")
        send(page, "hello from a newcomer")
        expect(message(page, "hello from a newcomer")).to_have_count(1)
        assert not [c for c in console if "Content Security Policy" in c], console
