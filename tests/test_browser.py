"""End to end in real headless Chromium (Playwright driving the system's /usr/bin/chromium): the demo page.

- Two pages join a room; a message typed in one appears in the other; the shared board converges.
- The server is restarted mid-session (a real process: SIGTERM drain, then a new process on the
  same port); both pages reconnect by themselves and end up showing the messages published while
  they were away, exactly once. On Redis the messages are published through a second replica
  while the first is down and recovered from history (``recovered: true``); on the default memory
  bus the restart loses history (a new epoch) and the page reloads it.

Chromium and Node are system tools: without them these tests skip, except on CI (.ci/run installs
them, and tests/conftest.py turns a skip into a failure there).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import async_playwright

from tests.helpers import ServerProcess
from wirehub.brokers import RedisServer
from wirehub.client import Client
from wirehub.testing import LiveServer, free_port, unique_room

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = os.environ.get("WIREHUB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SHOTS = Path(os.environ.get("WIREHUB_SCREENSHOTS", "/tmp"))


def _chromium() -> str | None:
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    path = _chromium()
    if path is None:
        pytest.skip("Chromium is not installed: apt-get install -y chromium (.ci/run installs it)")
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


async def open_page(browser: Any, url: str) -> Any:
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    page = await context.new_page()
    errors: list[str] = []
    console: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}"))
    page.errors = errors
    page.console = console
    await page.goto(url)
    await page.wait_for_selector("#status[data-status=open]", timeout=10_000)
    await page.wait_for_selector("#board[data-ready='1']", timeout=10_000)
    return page


async def type_message(page: Any, text: str) -> None:
    await page.fill("#message-input", text)
    await page.press("#message-input", "Enter")


async def count_text(page: Any, text: str) -> int:
    n: int = await page.locator("#messages li .text", has_text=text).count()
    return n


async def eventually(check: Callable[[], Any], timeout: float = 15.0,
                     what: str | Callable[[], str] = "condition") -> None:
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what() if callable(what) else what} not met within {timeout}s")
        await asyncio.sleep(0.1)


async def board(page: Any) -> dict[str, str]:
    owners: dict[str, str] = await page.evaluate(
        "() => Object.fromEntries([...document.querySelectorAll('#board .cell')]"
        ".filter(c => c.dataset.owner).map(c => [c.dataset.key, c.dataset.owner]))")
    return owners


# -- two windows on the default config -----------------------------------------------------------------------


async def test_two_pages_chat_and_share_the_board(wirehub_server: Callable[..., Any], browser: Any) -> None:
    server: LiveServer = await wirehub_server()  # the default config: anonymous auth, memory bus
    room, game = unique_room("demo"), unique_room("board")
    url = server.url(f"/?room={room}&game={game}")
    p1 = await open_page(browser, url)
    p2 = await open_page(browser, url)
    me1 = await p1.evaluate("() => window.wirehubChat.welcome.user")
    me2 = await p2.evaluate("() => window.wirehubChat.welcome.user")

    await type_message(p1, "hello from window one")
    await p2.wait_for_selector("#messages li:has-text('hello from window one')", timeout=5000)
    await type_message(p2, "hi back")
    await p1.wait_for_selector("#messages li:has-text('hi back')", timeout=5000)
    assert await count_text(p1, "hello from window one") == 1  # the sender shows its own once
    # presence: both users in both pages
    for page in (p1, p2):
        await page.wait_for_function(
            f"() => document.querySelectorAll('#presence li').length === 2 && "
            f"document.querySelector('#presence li[data-user=\"{me1}\"]') && "
            f"document.querySelector('#presence li[data-user=\"{me2}\"]')", timeout=5000)

    # a second room, joined through the form; the room list switches between them
    side = unique_room("side")
    for page in (p1, p2):
        await page.fill("#join-input", side)
        await page.press("#join-input", "Enter")
        await page.wait_for_selector(f"#room-title:has-text('#{side}')", timeout=5000)
    for page in (p1, p2):
        await page.wait_for_function("() => document.querySelectorAll('#presence li').length === 2", timeout=5000)
    await type_message(p1, "in the side room")
    await p2.wait_for_selector("#messages li:has-text('in the side room')", timeout=5000)
    assert await count_text(p2, "hi back") == 0  # another room's messages are not mixed in
    await p2.click(f"#rooms li[data-room='{room}']")
    await p2.wait_for_selector("#messages li:has-text('hi back')", timeout=5000)
    await p1.click(f"#rooms li[data-room='{room}']")

    # a third window loads the history
    p3 = await open_page(browser, url)
    await p3.wait_for_selector("#messages li:has-text('hi back')", timeout=5000)
    assert await count_text(p3, "hello from window one") == 1

    # the board: clicks in both windows at once converge to one state
    async def clicks(page: Any, keys: list[str]) -> None:  # one pointer per page: its clicks in turn
        for key in keys:
            await page.click(f"#board .cell[data-key='{key}']")

    await asyncio.gather(clicks(p1, ["0-0", "3-4"]), clicks(p2, ["7-7", "4-3"]))

    async def converged() -> bool:
        b1, b2 = await board(p1), await board(p2)
        return b1 == b2 and len(b1) == 4

    async def game_states() -> Any:
        js = "() => [...window.wirehubGame.games.values()].map(g => [g.version, g.resyncs, g.state])"
        return await p1.evaluate(js), await p2.evaluate(js), await board(p1), await board(p2)

    try:
        await eventually(converged, 10, lambda: f"the boards converge ({p1.console} {p2.console})")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {await game_states()}") from None
    # the board's owners are the game connection's users (anonymous: a guest per connection)
    g1 = await p1.evaluate("() => window.wirehubGame.welcome.user")
    g2 = await p2.evaluate("() => window.wirehubGame.welcome.user")
    b = await board(p1)
    assert b == {"0-0": g1, "3-4": g1, "7-7": g2, "4-3": g2}
    v1 = await p1.text_content("#game-version")
    assert v1 == await p2.text_content("#game-version") and int(v1 or 0) >= 1
    # clicking one's own cell clears it, everywhere
    await p2.click("#board .cell[data-key='7-7']")

    async def cleared() -> bool:
        return "7-7" not in await board(p1) and "7-7" not in await board(p2)

    await eventually(cleared, 10, "the cleared cell")
    await p1.screenshot(path=str(SHOTS / "wirehub-demo.png"))
    assert p1.errors == [] and p2.errors == [] and p3.errors == []


# -- a real server restart mid-session --------------------------------------------------------------------------


@pytest.fixture
def processes(tmp_path: Path) -> Any:
    """``processes(name, extra_yaml)``: a ``wirehub serve`` with a config file, restartable on its port
    (``stop()`` is SIGTERM: the drain closes every session with 1001 and a retry hint); stopped at the end."""
    made: list[ServerProcess] = []

    def make(name: str, extra: str, port: int | None = None) -> ServerProcess:
        port = port or free_port()
        config = tmp_path / f"{name}.yaml"
        config.write_text(
            f"server: {{host: 127.0.0.1, port: {port}, ping_interval: 5, ping_timeout: 4}}\n"
            "drain: {grace: 3, reconnect_jitter: 0.3}\n"
            "logging: {level: warning}\n" + extra)
        proc = ServerProcess(config, port, name=name)
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.stop()


@pytest.mark.parametrize("bus", ["redis", "memory"])
async def test_pages_recover_across_a_server_restart(bus: str, browser: Any, processes: Any,
                                                     request: pytest.FixtureRequest) -> None:
    if bus == "redis":
        redis: RedisServer = request.getfixturevalue("redis_server")
        prefix = unique_room("e2e")
        extra = f"bus: {{plugin: redis, redis: {{url: '{redis.url}', key_prefix: {prefix}}}}}\n"
    else:
        extra = ""
    a = processes("a", extra)
    await a.start_ready()
    room, game = unique_room("demo"), unique_room("board")
    url = f"http://127.0.0.1:{a.port}/?room={room}&game={game}"
    p1 = await open_page(browser, url)
    p2 = await open_page(browser, url)
    await type_message(p1, "before the restart")
    await p2.wait_for_selector("#messages li:has-text('before the restart')", timeout=5000)
    await p1.click("#board .cell[data-key='1-1']")

    # The pages' server goes away (drain: 1001 + hint); messages are published while they are away.
    await asyncio.to_thread(a.stop)
    await p1.wait_for_selector("#status:not([data-status=open])", timeout=5000)
    await p2.wait_for_selector("#status:not([data-status=open])", timeout=5000)
    missed = ["while away one", "while away two"]
    if bus == "redis":
        b = processes("b", extra)  # another replica on the same Redis: the room goes on without A
        await b.start_ready()
        await publish_all(f"ws://127.0.0.1:{b.port}/ws/chat", room, missed)
        await a.start_ready()
    else:
        await a.start_ready()  # a fresh process: the memory history is gone
        await publish_all(f"ws://127.0.0.1:{a.port}/ws/chat", room, missed)

    for page in (p1, p2):
        await page.wait_for_selector("#status[data-status=open]", timeout=20_000)
        for text in missed:
            await page.wait_for_selector(f"#messages li:has-text('{text}')", timeout=10_000)
    notice = "recovered" if bus == "redis" else "history reloaded"
    for page in (p1, p2):
        await page.wait_for_selector(f"#messages li.notice:has-text('{notice}')", timeout=5000)
        assert await count_text(page, "before the restart") == 1
        for text in missed:
            assert await count_text(page, text) == 1, f"{text!r} shown more than once"

    # and the pages go on talking after the restart
    await type_message(p2, "after the restart")
    await p1.wait_for_selector("#messages li:has-text('after the restart')", timeout=5000)
    await p2.click("#board .cell[data-key='6-6']")

    async def converged() -> bool:
        b1, b2 = await board(p1), await board(p2)
        return b1 == b2 and "6-6" in b1

    await eventually(converged, 10, "the boards converge after the restart")
    await p1.screenshot(path=str(SHOTS / f"wirehub-demo-restart-{bus}.png"))
    assert p1.errors == [] and p2.errors == []


async def publish_all(url: str, room: str, texts: list[str]) -> None:
    async with Client(url, backoff_min=0.05, backoff_max=0.5, ping_interval=0) as client:
        await client.join(room, lambda _m: None)
        for text in texts:
            await client.publish(room, {"text": text})


# -- Server-Sent Events in a real EventSource --------------------------------------------------------------


async def test_event_source_recovers_with_last_event_id(wirehub_server: Callable[..., Any], browser: Any) -> None:
    """The browser's own EventSource: after the server ends the stream it reconnects by itself,
    sending Last-Event-ID, and gets the messages published meanwhile exactly once."""
    from wirehub.sse import close_streams, open_streams

    server: LiveServer = await wirehub_server()
    a, b = unique_room("sse"), unique_room("sse")
    context = await browser.new_context()
    page = await context.new_page()
    await page.goto(server.url("/healthz"))  # any page of the same origin
    await page.evaluate("""(rooms) => {
        window.got = []; window.joined = [];
        const es = new EventSource('/sse?rooms=' + rooms);
        es.addEventListener('message', (e) => got.push(JSON.parse(e.data).data));
        es.addEventListener('joined', (e) => joined.push(JSON.parse(e.data)));
    }""", f"{a},{b}")
    await page.wait_for_function("() => window.joined.length === 2", timeout=5000)
    async with Client(server.ws_url("/ws/chat"), ping_interval=0) as sender:
        await sender.join(a, lambda _m: None)
        await sender.join(b, lambda _m: None)
        await sender.publish(a, "a1")
        await sender.publish(b, "b1")
        await page.wait_for_function("() => window.got.length === 2", timeout=5000)
        assert close_streams(server.app, reconnect_jitter=0.5) == 1  # as a drain does; retry <= 500 ms
        await sender.publish(a, "a2")
        await sender.publish(b, "b2")
        await page.wait_for_function("() => window.joined.length === 4", timeout=5000)
        await page.wait_for_function("() => window.got.length >= 4", timeout=5000)
        await sender.publish(a, "a3")
        await page.wait_for_function("() => window.got.length >= 5", timeout=5000)
    await asyncio.sleep(0.3)
    got = await page.evaluate("() => window.got")
    joined = await page.evaluate("() => window.joined")
    assert sorted(got) == ["a1", "a2", "a3", "b1", "b2"] and len(got) == 5  # each exactly once
    assert got[-1] == "a3"
    assert [j["recovered"] for j in joined[2:]] == [True, True]
    assert len(open_streams(server.app)) == 1
    await context.close()
