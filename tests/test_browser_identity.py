"""The demo page in real headless Chromium (Playwright, /usr/bin/chromium): one identity per tab, "(you)"
in presence, clearly distinct colours, long names that stay inside their boxes, and a board that is never
stale (nor its buttons wrapped) while the connection is down.

Without Chromium these skip, except on CI (.ci/run installs it; tests/conftest.py turns a skip into a failure).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

import jwt
import pytest

from tests.test_browser import board, browser, eventually, open_page, processes, type_message  # noqa: F401
from wirehub.testing import LiveServer, unique_room

pytestmark = [pytest.mark.browser, pytest.mark.slow]

SECRET = "d" * 40
#: CIE76 distance two users' colours must keep at least: about what tells red from orange at a glance
CLEAR_MARGIN = 25.0


def lab(css: str) -> tuple[float, float, float]:
    """CIE L*a*b* (D65) of a computed CSS colour, ``rgb(r, g, b)``."""
    r, g, b = (int(v) / 255 for v in re.findall(r"\d+", css)[:3])

    def lin(c: float) -> float:
        return ((c + 0.055) / 1.055) ** 2.4 if c > 0.04045 else c / 12.92

    r, g, b = lin(r), lin(g), lin(b)
    x = (r * 0.4124 + g * 0.3576 + b * 0.1805) / 0.95047
    y = r * 0.2126 + g * 0.7152 + b * 0.0722
    z = (r * 0.0193 + g * 0.1192 + b * 0.9505) / 1.08883

    def f(t: float) -> float:
        return t ** (1 / 3) if t > 0.008856 else 7.787 * t + 16 / 116

    return 116 * f(y) - 16, 500 * (f(x) - f(y)), 200 * (f(y) - f(z))


def delta_e(a: str, b: str) -> float:
    return math.dist(lab(a), lab(b))


async def me(page: Any) -> str:
    user: str = await page.evaluate("() => window.wirehubChat.welcome.user")
    return user


async def dot_colour(page: Any, user: str) -> str:
    await page.wait_for_selector(f"#presence li[data-user='{user}'] .dot", timeout=5000)
    colour: str = await page.eval_on_selector(f"#presence li[data-user='{user}'] .dot",
                                              "e => getComputedStyle(e).backgroundColor")
    return colour


async def test_one_identity_per_tab_with_you_and_distinct_colours(wirehub_server: Callable[..., Any],
                                                                  browser: Any) -> None:  # noqa: F811
    server: LiveServer = await wirehub_server()
    room, game = unique_room("id"), unique_room("board")
    url = server.url(f"/?room={room}&game={game}")
    p1, p2 = await open_page(browser, url), await open_page(browser, url)
    me1, me2 = await me(p1), await me(p2)
    assert me1 != me2
    for page, user in ((p1, me1), (p2, me2)):
        # the chat and the board are one person, with one colour
        assert await page.evaluate("() => window.wirehubGame.welcome.user") == user
        assert await page.get_attribute("#me", "data-user") == user
        colour = await dot_colour(page, user)
        assert await page.eval_on_selector("#my-colour", "e => getComputedStyle(e).backgroundColor") == colour
        assert await page.eval_on_selector("#me .dot", "e => getComputedStyle(e).backgroundColor") == colour
    await p1.click("#board .cell[data-key='2-5']")
    await type_message(p1, "mine")
    await eventually(lambda: _owner(p2, "2-5", me1), 5, "p1's cell owned by p1's chat user")
    await p2.wait_for_selector("#messages li:has-text('mine')", timeout=5000)
    # everyone sees the same person: the message's sender, the cell's owner and the presence entry agree
    assert await p2.text_content("#messages li:has-text('mine') .from") == me1
    cell = await p2.eval_on_selector("#board .cell[data-key='2-5']", "e => getComputedStyle(e).backgroundColor")
    assert cell == await dot_colour(p2, me1)

    # "(you)" next to one's own entry only
    for page, mine, other in ((p1, me1, me2), (p2, me2, me1)):
        await page.wait_for_selector(f"#presence li[data-user='{other}']", timeout=5000)
        assert (await page.text_content(f"#presence li[data-user='{mine}'] .you")) == "(you)"
        assert await page.locator(f"#presence li[data-user='{other}'] .you").count() == 0
        assert "(you)" not in (await page.inner_text(f"#presence li[data-user='{other}']"))

    # two users' colours differ by a clear margin, in both pages
    for page in (p1, p2):
        assert delta_e(await dot_colour(page, me1), await dot_colour(page, me2)) >= CLEAR_MARGIN
    # every pair of the palette does: a hash can only pick clearly different colours
    palette: list[str] = await p1.evaluate(
        "async () => (await import('/static/identity.js')).PALETTE.map((h) => "
        "{ const e = document.createElement('i'); e.style.color = h; document.body.append(e);"
        "  const c = getComputedStyle(e).color; e.remove(); return c; })")
    assert len(palette) >= 10
    assert min(delta_e(a, b) for a, b in itertools.combinations(palette, 2)) >= CLEAR_MARGIN
    assert p1.errors == [] and p2.errors == []


async def test_two_users_whose_hash_picks_one_colour_still_get_two(wirehub_server: Callable[..., Any],
                                                                   browser: Any) -> None:  # noqa: F811
    """Guest keys chosen so that both users hash to the same palette slot: the page moves one of them."""
    server: LiveServer = await wirehub_server()
    room = unique_room("clash")
    url = server.url(f"/?room={room}&game={unique_room('board')}")
    probe = await open_page(browser, url)
    slots: dict[int, str] = {}
    keys: tuple[str, str] | None = None
    while keys is None:  # a birthday search over 12 slots: a few keys
        key = secrets.token_urlsafe(24)
        user = f"guest-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
        slot: int = await probe.evaluate(f"async () => (await import('/static/identity.js')).paletteSlot('{user}')")
        if slot in slots:
            keys = (slots[slot], key)
        slots[slot] = key
    pages = []
    for key in keys:
        context = await browser.new_context(viewport={"width": 1280, "height": 800})
        await context.add_init_script(f"sessionStorage.setItem('wirehub.guest', '{key}')")
        page = await context.new_page()
        page.errors = []
        page.on("pageerror", lambda exc, errors=page.errors: errors.append(str(exc)))
        await page.goto(url)
        await page.wait_for_selector("#status[data-status=open]", timeout=10_000)
        pages.append(page)
    u1, u2 = await me(pages[0]), await me(pages[1])
    assert u1 != u2
    assert await pages[0].evaluate(f"async () => {{ const m = await import('/static/identity.js');"
                                   f" return m.paletteSlot('{u1}') === m.paletteSlot('{u2}'); }}")
    for page in pages:
        assert delta_e(await dot_colour(page, u1), await dot_colour(page, u2)) >= CLEAR_MARGIN
        assert page.errors == []


async def test_a_200_character_name_stays_inside_its_boxes(wirehub_server: Callable[..., Any],
                                                           browser: Any) -> None:  # noqa: F811
    server: LiveServer = await wirehub_server({
        "auth": {"plugin": "jwt", "jwt": {"algorithms": ["HS256"], "secret": SECRET}},
        "endpoints": [{"path": "/ws/chat", "handler": "chat"}, {"path": "/ws/game", "handler": "game"},
                      {"path": "/ws/yjs/*", "handler": "yjs"}]})
    long_name = "Bartholomew-" + "x" * 188
    assert len(long_name) == 200
    user = "u" * 120  # a long user id too (the sender shown on messages, the board's cell titles)
    token = jwt.encode({"sub": user, "name": long_name, "rooms": ["*"], "exp": int(time.time() + 600)}, SECRET,
                       algorithm="HS256")
    room = unique_room("long")
    for width in (1280, 380):
        context = await browser.new_context(viewport={"width": width, "height": 800})
        page = await context.new_page()
        await page.goto(server.url(f"/?room={room}&game={unique_room('board')}&doc={room}&token={token}"))
        await page.wait_for_selector("#status[data-status=open]", timeout=10_000)
        await page.wait_for_selector(f"#presence li[data-user='{user}']", timeout=5000)
        await type_message(page, "a message from a long name")
        await page.wait_for_selector("#messages li .from", timeout=5000)
        await page.wait_for_selector("#collab-users li", timeout=10_000)
        boxes: list[dict[str, Any]] = await page.evaluate("""() => {
            const inside = (sel, box) => [...document.querySelectorAll(sel)].map((e) => {
              const r = e.getBoundingClientRect(), b = e.closest(box).getBoundingClientRect();
              return {sel, text: e.textContent.length, left: r.left, right: r.right, boxLeft: b.left,
                      boxRight: b.right, clipped: e.scrollWidth > e.clientWidth};
            });
            return [...inside('#me .name', 'header'), ...inside('#presence li .name', '#rooms-pane'),
                    ...inside('#presence li .you', '#rooms-pane'), ...inside('#messages li .from', '#chat'),
                    ...inside('#collab-users li', '#collab')];
          }""")
        assert {b["sel"] for b in boxes} == {"#me .name", "#presence li .name", "#presence li .you",
                                             "#messages li .from", "#collab-users li"}, boxes
        for b in boxes:
            assert b["boxLeft"] - 0.5 <= b["left"] and b["right"] <= b["boxRight"] + 0.5, (width, b)
            if b["sel"] != "#presence li .you":
                assert b["text"] >= 120 and b["clipped"], (width, b)  # the long text is there, cut by an ellipsis
        # and the page itself does not scroll sideways
        assert await page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth"), width
        assert await page.get_attribute("#me", "title") == f"you are {long_name} ({user})"
        await context.close()


async def test_reconnecting_shows_it_then_the_fresh_board(browser: Any, processes: Any) -> None:  # noqa: F811
    a = processes("a", "")  # the default memory bus: a restart starts the board over
    await a.start_ready()
    room, game = unique_room("re"), unique_room("board")
    url = f"http://127.0.0.1:{a.port}/?room={room}&game={game}"
    page = await open_page(browser, url)
    await page.click("#board .cell[data-key='1-1']")
    await eventually(lambda: _has(page, "1-1"), 5, "the painted cell")

    await asyncio.to_thread(a.stop)  # SIGTERM: drain, 1001 with a retry hint, then gone
    await page.wait_for_selector("#status[data-status=reconnecting]", timeout=5000)
    await page.wait_for_selector("#board[data-stale='1']", timeout=5000)
    assert await page.text_content("#game-status") == "reconnecting…"
    assert await board(page) == {}  # nothing stale is shown while away
    assert await page.eval_on_selector("#clear-board", "e => e.disabled")
    label = await page.evaluate("() => getComputedStyle(document.querySelector('.board-wrap'), '::after').content")
    assert "reconnecting" in label
    await _buttons_stay_in_line(page)

    await a.start_ready()
    await page.wait_for_selector("#status[data-status=open]", timeout=20_000)
    await page.wait_for_selector("#board:not([data-stale])", timeout=10_000)
    assert await page.text_content("#game-status") == "open"
    # the fresh board (the new process has none of the old state), and it goes on working
    assert await board(page) == {}
    assert await page.evaluate("() => [...window.wirehubGame.games.values()][0].version") == 0
    other = await open_page(browser, url)
    await other.click("#board .cell[data-key='6-2']")
    await eventually(lambda: _has(page, "6-2"), 10, "a cell painted after the restart")
    assert not await page.eval_on_selector("#clear-board", "e => e.disabled")
    await _buttons_stay_in_line(page)
    assert page.errors == [] and other.errors == []


async def _buttons_stay_in_line(page: Any) -> None:
    """At every width from a phone's to a desktop's, each visible button's label is one line, and the button
    sits inside its parent on the line of the parent's first item (the input it sends, the heading it acts
    on): it never drops below it."""
    for width in (1400, 1280, 960, 900, 700, 420, 360, 300):
        await page.set_viewport_size({"width": width, "height": 800})
        buttons: list[dict[str, Any]] = await page.evaluate("""() => [...document.querySelectorAll('button')]
            .filter((b) => b.offsetParent !== null).map((b) => {
              const range = document.createRange(); range.selectNodeContents(b);
              const lines = new Set([...range.getClientRects()].map((r) => Math.round(r.top))).size;
              const r = b.getBoundingClientRect(), p = b.parentElement.getBoundingClientRect();
              const first = b.parentElement.firstElementChild.getBoundingClientRect();
              return {id: b.id || b.textContent, lines, inside: r.left >= p.left - 0.5 && r.right <= p.right + 0.5,
                      inLine: r.top < first.bottom && r.bottom > first.top};
            })""")
        assert len(buttons) >= 3, buttons
        for b in buttons:
            assert b["lines"] == 1 and b["inside"] and b["inLine"], (width, buttons)
    await page.set_viewport_size({"width": 1280, "height": 800})


async def _owner(page: Any, key: str, user: str) -> bool:
    return (await board(page)).get(key) == user


async def _has(page: Any, key: str) -> bool:
    return key in await board(page)
