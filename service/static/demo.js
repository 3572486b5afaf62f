// The demo page: a chat (rooms, presence, history) and a shared board, on /static/wirehub.js, as one
// identity per tab (identity.js). URL parameters: ?room=lobby (first room) &game=board (board room)
// &token=... (JWT setups).
import { WirehubClient } from "/static/wirehub.js";
import { colour, endpoint, setIdentity, token, whenIdentity } from "/static/identity.js";

const params = new URLSearchParams(location.search);
const firstRoom = params.get("room") || "lobby";
const gameRoom = params.get("game") || "board";
const SIZE = 8;

const $ = (/** @type {string} */ sel) => /** @type {HTMLElement} */ (document.querySelector(sel));
const el = (/** @type {string} */ tag, /** @type {string} */ cls = "", /** @type {string} */ text = "") => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text) e.textContent = text;
  return e;
};

// -- chat -------------------------------------------------------------------------------------------------

const chat = new WirehubClient(endpoint("/ws/chat"), { token });
window.wirehubChat = chat; // for the console and the browser tests

/** @type {Map<string, {items: any[], keys: Set<string>, epochs: string[], unread: number, presence: any[], count: number | null}>} */
const rooms = new Map();
let current = firstRoom;

function roomState(/** @type {string} */ room) {
  let st = rooms.get(room);
  if (!st) rooms.set(room, (st = { items: [], keys: new Set(), epochs: [], unread: 0, presence: [], count: null }));
  return st;
}

/** Add a message once (by epoch:offset), in (epoch seen order, offset) order. */
function addMessage(/** @type {string} */ room, /** @type {any} */ msg, /** @type {string} */ epoch) {
  const st = roomState(room);
  const key = `${epoch}:${msg.offset}`;
  if (st.keys.has(key)) return;
  st.keys.add(key);
  if (!st.epochs.includes(epoch)) st.epochs.push(epoch);
  const item = { ...msg, epochIndex: st.epochs.indexOf(epoch) };
  let i = st.items.length;
  while (i > 0 && (st.items[i - 1].epochIndex > item.epochIndex ||
      (st.items[i - 1].epochIndex === item.epochIndex && st.items[i - 1].offset > item.offset))) i--;
  st.items.splice(i, 0, item);
  if (room !== current) st.unread += 1;
  render();
}

function notice(/** @type {string} */ room, /** @type {string} */ text) {
  const st = roomState(room);
  const last = st.items[st.items.length - 1];
  st.items.push({ notice: text, epochIndex: last ? last.epochIndex : 0, offset: last ? last.offset : 0 });
  render();
}

async function loadHistory(/** @type {string} */ room) {
  const sub = chat.rooms.get(room);
  if (!sub) return;
  const page = await chat.history(room, { limit: 50 });
  for (const m of page.messages) addMessage(room, m, page.epoch);
}

async function joinRoom(/** @type {string} */ room) {
  if (chat.rooms.has(room)) return selectRoom(room);
  roomState(room);
  selectRoom(room);
  try {
    await chat.join(room, (msg) => addMessage(room, msg, /** @type {string} */ (chat.rooms.get(room)?.epoch)), {
      onJoined: (info) => {
        showPresence(room);
        if (!info.rejoin) return;
        if (info.recovered) notice(room, "reconnected: missed messages recovered");
        else {
          notice(room, "reconnected: history reloaded");
          loadHistory(room).catch(console.error);
        }
      },
      onPresence: () => showPresence(room),
      onGap: () => loadHistory(room).catch(console.error),
    });
    await loadHistory(room);
  } catch (err) {
    notice(room, `could not join: ${/** @type {any} */ (err).message}`);
  }
  render();
}

/** A big room's list is a sample: "N here" tells the size; the page draws at most this many names. */
const SHOWN_MEMBERS = 100;

/**
 * The member list and "N here" from the subscription, which the client keeps up to date from
 * presence.join / presence.leave / presence.diff: no request per event, however big the room.
 * In a big room the list holds the members joined listed (the first page) plus the newcomers.
 */
function showPresence(/** @type {string} */ room) {
  const sub = chat.rooms.get(room);
  if (!sub) return;
  const st = roomState(room);
  st.presence = [...sub.members.values()].sort((a, b) => (a.user < b.user ? -1 : a.user > b.user ? 1 : 0))
    .slice(0, SHOWN_MEMBERS);
  st.count = sub.count ? sub.count.users : null;
  render();
}

function selectRoom(/** @type {string} */ room) {
  current = room;
  roomState(room).unread = 0;
  render();
}

let renderQueued = false;
function render() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => { renderQueued = false; draw(); });
}

/** A user's display name: from the presence lists (users' names), else the user. */
function nameOf(/** @type {string} */ user) {
  if (chat.welcome && chat.welcome.user === user) return chat.welcome.name || user;
  for (const sub of chat.rooms.values()) {
    const m = sub.members.get(user);
    if (m && m.name) return m.name;
  }
  return user;
}

function draw() {
  const me = chat.welcome ? chat.welcome.user : "";
  const meEl = $("#me");
  meEl.replaceChildren();
  if (me) {
    const dot = el("span", "dot");
    dot.style.background = colour(me);
    meEl.append(dot, el("span", "name", nameOf(me)));
    meEl.title = `you are ${nameOf(me)} (${me})`;
    meEl.dataset.user = me;
  }
  const roomsEl = $("#rooms");
  roomsEl.replaceChildren(...[...rooms.keys()].map((room) => {
    const li = el("li", room === current ? "active" : "", `#${room}`);
    li.dataset.room = room;
    const unread = rooms.get(room)?.unread || 0;
    if (unread) li.append(el("span", "unread", String(unread)));
    li.onclick = () => selectRoom(room);
    return li;
  }));
  $("#room-title").textContent = `#${current}`;
  const st = roomState(current);
  const list = $("#messages");
  const atBottom = list.scrollTop + list.clientHeight >= list.scrollHeight - 20;
  list.replaceChildren(...st.items.map((m) => {
    if (m.notice) return el("li", "notice", m.notice);
    const li = el("li", m.from === me ? "mine" : "");
    li.dataset.offset = String(m.offset);
    const from = el("span", "from", nameOf(m.from));
    from.style.color = colour(m.from);
    from.title = m.from;
    const text = typeof m.data === "object" && m.data !== null && "text" in m.data ? String(m.data.text) : JSON.stringify(m.data);
    li.append(from, el("span", "text", text), el("span", "time", new Date(m.ts * 1000).toLocaleTimeString()));
    return li;
  }));
  if (atBottom) list.scrollTop = list.scrollHeight;
  const here = st.count ?? st.presence.length;
  $("#presence-count").textContent = st.count === null && !st.presence.length ? "" : `${here} here`;
  $("#presence-count").dataset.count = String(here);
  $("#presence").replaceChildren(...st.presence.map((p) => {
    const li = el("li", p.user === me ? "me" : "");
    const dot = el("span", "dot");
    dot.style.background = colour(p.user);
    const name = el("span", "name", p.name || p.user);
    li.title = p.name && p.name !== p.user ? `${p.name} (${p.user})` : p.user;
    li.append(dot, name);
    if (p.user === me) li.append(el("span", "you", "(you)"));
    if (p.connections > 1) li.append(el("small", "", `×${p.connections}`));
    li.dataset.user = p.user;
    return li;
  }));
}

chat.on("status", (s) => {
  $("#status").textContent = s;
  $("#status").dataset.status = s;
  document.body.dataset.chat = s; // the presence list dims while it may be out of date
});
chat.on("welcome", (w) => { setIdentity(w); render(); });
chat.on("error", (err) => console.warn("wirehub:", err));

$("#send-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const input = /** @type {HTMLInputElement} */ ($("#message-input"));
  const text = input.value.trim();
  if (!text) return;
  input.value = "";
  const room = current;
  try {
    const { offset } = await chat.publish(room, { text });
    const sub = chat.rooms.get(room);
    addMessage(room, { op: "message", room, from: chat.welcome.user, data: { text }, offset, ts: Date.now() / 1000 },
      /** @type {string} */ (sub?.epoch));
  } catch (err) {
    notice(room, `not sent (${/** @type {any} */ (err).code}): ${text}`);
  }
});

$("#join-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const input = /** @type {HTMLInputElement} */ ($("#join-input"));
  const room = input.value.trim();
  input.value = "";
  if (room) joinRoom(room);
});

// -- the shared board --------------------------------------------------------------------------------------

const game = new WirehubClient(endpoint("/ws/game"), { token });
window.wirehubGame = game;
/** @type {import("./wirehub.js").GameRoom | null} */
let board = null;

const boardEl = $("#board");
for (let y = 0; y < SIZE; y++) {
  for (let x = 0; x < SIZE; x++) {
    const cell = el("div", "cell");
    cell.dataset.key = `${x}-${y}`;
    cell.onclick = () => paint(`${x}-${y}`);
    boardEl.append(cell);
  }
}
$("#game-room").textContent = `#${gameRoom}`;

/** While the board's connection is down its state is stale: the board shows nothing until the rejoin. */
let stale = false;

function drawBoard() {
  // the board's state is {"<x>-<y>": "<user>"}: one member per painted cell
  const cells = (!stale && board && board.state && typeof board.state === "object" && board.state) || {};
  for (const cell of /** @type {NodeListOf<HTMLElement>} */ (boardEl.querySelectorAll(".cell"))) {
    const owner = cells[/** @type {string} */ (cell.dataset.key)];
    cell.style.background = owner ? colour(owner) : "";
    cell.dataset.owner = owner || "";
    cell.title = owner ? nameOf(owner) : "";
  }
  $("#game-version").textContent = stale ? "…" : String(board ? board.version : 0);
  if (game.welcome) $("#my-colour").style.background = colour(game.welcome.user);
  if (stale) boardEl.dataset.stale = "1";
  else delete boardEl.dataset.stale;
  /** @type {HTMLButtonElement} */ ($("#clear-board")).disabled = stale || !board;
}

async function paint(/** @type {string} */ key) {
  if (!board || !game.welcome || stale) return;
  const me = game.welcome.user;
  const cells = board.state || {};
  const patch = cells[key] === me
    ? [{ op: "test", path: `/${key}`, value: me }, { op: "remove", path: `/${key}` }]
    : [{ op: "add", path: `/${key}`, value: me }];
  try {
    await board.update(patch);
  } catch (err) {
    console.warn("board update refused", err);
    board.sync();
  }
}

$("#clear-board").addEventListener("click", async () => {
  if (!board || !game.welcome || !board.state || stale) return;
  const me = game.welcome.user;
  const mine = Object.keys(board.state).filter((k) => board?.state[k] === me);
  if (mine.length) await board.update(mine.map((k) => ({ op: "remove", path: `/${k}` }))).catch(() => board?.sync());
});

game.on("status", (s) => {
  $("#game-status").textContent = s === "reconnecting" ? "reconnecting…" : s;
  $("#game-status").dataset.status = s;
  // Down: the state is stale (others go on painting); the rejoin brings a fresh one before "open".
  const wasStale = stale;
  stale = s !== "open";
  if (stale !== wasStale) drawBoard();
});

// -- start ------------------------------------------------------------------------------------------------

joinRoom(firstRoom);
// the board after the chat's welcome: the tab's own colour is taken first (identity.js)
whenIdentity()
  .then(() => game.joinGame(gameRoom, () => drawBoard()))
  .then((room) => { board = room; boardEl.dataset.ready = "1"; drawBoard(); })
  .catch((err) => { $("#game-status").textContent = `could not join: ${err.message}`; });
