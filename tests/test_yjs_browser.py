"""The demo page's shared text editor in real headless Chromium (Playwright, the system's Chromium):
two pages edit one document and see each other's text and cursors; one reloads and catches up.

The page loads the real yjs and y-websocket packages from /static/vendor/yjs.js (no CDN). Without
Chromium this skips, except on CI (.ci/run installs it; tests/conftest.py turns the skip into a failure).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests.test_browser import CHROMIUM_ARGS, _chromium
from wirehub.testing import LiveServer, unique_room

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ENDPOINTS = [{"path": "/ws/chat", "handler": "chat"}, {"path": "/ws/game", "handler": "game"},
             {"path": "/ws/yjs/*", "handler": "yjs"}]


@pytest.fixture
async def chromium() -> AsyncIterator[Any]:
    path = _chromium()
    if path is None:
        pytest.skip("Chromium is not installed: apt-get install -y chromium (.ci/run installs it)")
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


async def open_editor(browser: Any, url: str) -> Any:
    page = await (await browser.new_context(viewport={"width": 1280, "height": 900})).new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors
    await page.goto(url)
    await page.wait_for_selector("#collab-status[data-status=synced]", timeout=10_000)
    return page


async def identity(page: Any) -> str:
    await page.wait_for_function("() => window.wirehubChat && window.wirehubChat.welcome", timeout=10_000)
    user: str = await page.evaluate("() => window.wirehubChat.welcome.user")
    return user


async def text_of(page: Any) -> str:
    value: str = await page.eval_on_selector("#collab-text", "e => e.value")
    return value


async def test_two_pages_edit_together_see_cursors_and_a_reload_catches_up(
        wirehub_server: Callable[..., Any], chromium: Any) -> None:
    server: LiveServer = await wirehub_server({"endpoints": ENDPOINTS})
    doc = unique_room("doc")
    ann = await open_editor(chromium, server.url(f"/?doc={doc}"))
    bob = await open_editor(chromium, server.url(f"/?doc={doc}"))
    # the editor names each cursor as the tab's one identity: the chat's user (a guest here)
    ann_name, bob_name = await identity(ann), await identity(bob)
    assert ann_name != bob_name

    await ann.click("#collab-text")
    await ann.keyboard.type("hello from ann.")
    await bob.wait_for_function("() => document.querySelector('#collab-text').value === 'hello from ann.'",
                                timeout=5000)
    await bob.click("#collab-text")
    await bob.keyboard.press("End")
    await bob.keyboard.type(" bob too.")
    await ann.keyboard.press("Home")
    await ann.keyboard.type(">> ")
    want = ">> hello from ann. bob too."
    for page in (ann, bob):  # 15 s: under the whole suite on two cores, 5 s was once too short
        await page.wait_for_function(f"() => document.querySelector('#collab-text').value === {want!r}",
                                     timeout=15000)
    # each sees the other's cursor, named, where the other is typing
    await ann.wait_for_selector(f"#collab-cursors .caret[data-user={bob_name}]", timeout=5000)
    await bob.wait_for_selector(f"#collab-cursors .caret[data-user={ann_name}]", timeout=5000)
    before_bob = await ann.evaluate(
        "() => { const o = document.querySelector('#collab-cursors'); const c = o.querySelector('.caret');"
        " let n = 0; for (const node of o.childNodes) { if (node === c) break; n += node.textContent.length; }"
        " return n; }")
    assert before_bob == len(want)  # bob's caret is at the end, after his text
    for page, other in ((ann, bob_name), (bob, ann_name)):
        await page.wait_for_selector(f"#collab-users li[data-user={other}]", timeout=5000)
    # and in the same colour as in the chat's presence
    ann_dot = await ann.eval_on_selector(f"#presence li[data-user={ann_name}] .dot",
                                         "e => getComputedStyle(e).backgroundColor")
    ann_li = await bob.eval_on_selector(f"#collab-users li[data-user={ann_name}]",
                                        "e => getComputedStyle(e).color")
    assert ann_dot == ann_li, (ann_dot, ann_li)

    # bob reloads: the page loads the document from the server and goes on
    await bob.reload()
    await bob.wait_for_selector("#collab-status[data-status=synced]", timeout=10_000)
    assert await text_of(bob) == want
    await bob.click("#collab-text")
    await bob.keyboard.press("End")
    await bob.keyboard.type(" back!")
    await ann.wait_for_function(f"() => document.querySelector('#collab-text').value === {want + ' back!'!r}",
                                timeout=5000)
    await ann.wait_for_selector(f"#collab-cursors .caret[data-user={bob_name}]", timeout=5000)
    assert await identity(bob) == bob_name  # a reload keeps the tab's identity (its guest key)
    await ann.screenshot(path="/tmp/wirehub-yjs-demo.png")
    assert ann.errors == [] and bob.errors == []


async def test_without_a_yjs_endpoint_the_editor_says_so(wirehub_server: Callable[..., Any], chromium: Any) -> None:
    server: LiveServer = await wirehub_server()  # the default config has no yjs endpoint
    page = await (await chromium.new_context()).new_page()
    await page.goto(server.url("/"))
    await page.wait_for_selector("#collab-status[data-status=off]", timeout=10_000)
    assert await page.eval_on_selector("#collab-text", "e => e.disabled")
