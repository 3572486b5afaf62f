// The demo page's shared text editor: the real yjs and y-websocket packages (bundled into
// /static/vendor/yjs.js by .ci/yjs-vendor/build.sh) on wirehub's yjs endpoint, with the other
// editors' cursors and selections drawn over the text, named and coloured as the tab's one identity
// (identity.js: the chat's user, name and colour). URL parameters: ?doc=demo (the document) &token=...
// (JWT setups). Needs a yjs endpoint at /ws/yjs/* (docs/collaboration.md); without one the section says
// so and connects nothing.
import { Y, WebsocketProvider } from "/static/vendor/yjs.js";
import { endpoint, token, whenIdentity } from "/static/identity.js";

const ENDPOINT = "/ws/yjs";
const params = new URLSearchParams(location.search);
const docName = params.get("doc") || "demo";

const $ = (/** @type {string} */ sel) => /** @type {HTMLElement} */ (document.querySelector(sel));
const area = /** @type {HTMLTextAreaElement} */ ($("#collab-text"));
const overlay = $("#collab-cursors");
const statusEl = $("#collab-status");
const usersEl = $("#collab-users");
$("#collab-doc").textContent = docName;

function setStatus(/** @type {string} */ status, /** @type {string} */ text = status) {
  statusEl.dataset.status = status;
  statusEl.textContent = text;
}

/** a plain GET of an endpoint path answers 426 when the endpoint exists, 404 when not */
async function enabled() {
  try {
    return (await fetch(`${ENDPOINT}/${encodeURIComponent(docName)}`)).status !== 404;
  } catch {
    return false;
  }
}

async function main() {
  if (!(await enabled())) {
    setStatus("off", "off: this server has no yjs endpoint (docs/collaboration.md)");
    area.disabled = true;
    return;
  }
  const ydoc = new Y.Doc();
  const ytext = ydoc.getText("text");
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  // y-websocket adds the document to the path and `params` to the query: the tab's guest key or token
  const guest = new URL(endpoint(ENDPOINT), location.href).searchParams.get("guest");
  const provider = new WebsocketProvider(`${scheme}://${location.host}${ENDPOINT}`, docName, ydoc,
    { params: token ? { token } : guest ? { guest } : {} });
  const awareness = provider.awareness;
  whenIdentity().then((id) => awareness.setLocalStateField("user", { name: id.name, id: id.user, color: id.colour }));
  window.wirehubYjs = { Y, ydoc, ytext, provider }; // for the console and the browser tests

  provider.on("status", (/** @type {{status: string}} */ e) => setStatus(e.status));
  provider.on("sync", (/** @type {boolean} */ synced) => { if (synced) setStatus("synced"); });

  // -- the local selection, kept as Yjs relative positions so remote edits do not move it --------
  /** @type {{anchor: any, head: any} | null} */
  let selection = null;
  const rel = (/** @type {number} */ i) => Y.createRelativePositionFromTypeIndex(ytext, i);
  const abs = (/** @type {any} */ r) => Y.createAbsolutePositionFromRelativePosition(r, ydoc)?.index ?? 0;

  function saveSelection() {
    const backward = area.selectionDirection === "backward";
    const anchor = backward ? area.selectionEnd : area.selectionStart;
    const head = backward ? area.selectionStart : area.selectionEnd;
    selection = { anchor: rel(anchor), head: rel(head) };
    awareness.setLocalStateField("cursor", {
      anchor: Y.relativePositionToJSON(selection.anchor), head: Y.relativePositionToJSON(selection.head),
    });
  }

  // -- local edits: the textarea's change as one delete + insert on the Y.Text ---------------------
  area.addEventListener("input", () => {
    const before = ytext.toString();
    const after = area.value;
    let start = 0;
    while (start < before.length && start < after.length && before[start] === after[start]) start++;
    let endBefore = before.length;
    let endAfter = after.length;
    while (endBefore > start && endAfter > start && before[endBefore - 1] === after[endAfter - 1]) {
      endBefore--;
      endAfter--;
    }
    ydoc.transact(() => {
      if (endBefore > start) ytext.delete(start, endBefore - start);
      if (endAfter > start) ytext.insert(start, after.slice(start, endAfter));
    }, "local");
    saveSelection();
  });
  for (const ev of ["select", "keyup", "mouseup", "focus"]) area.addEventListener(ev, saveSelection);
  document.addEventListener("selectionchange", () => { if (document.activeElement === area) saveSelection(); });

  // -- remote edits: new text, the local selection where it was ------------------------------------
  ytext.observe((/** @type {any} */ _event, /** @type {any} */ tr) => {
    if (tr.origin === "local") return;
    area.value = ytext.toString();
    if (selection && document.activeElement === area) {
      const a = abs(selection.anchor);
      const h = abs(selection.head);
      area.setSelectionRange(Math.min(a, h), Math.max(a, h), h < a ? "backward" : "forward");
    }
    render();
  });

  // -- the others' cursors: a mirror of the text under the textarea, with markers ------------------
  function render() {
    const text = ytext.toString();
    /** @type {{at: number, kind: string, user: any}[]} */
    const marks = [];
    const names = [];
    for (const [client, state] of awareness.getStates()) {
      if (!state.user) continue;
      names.push({ ...state.user, me: client === ydoc.clientID });
      if (client === ydoc.clientID || !state.cursor) continue;
      const a = abs(Y.createRelativePositionFromJSON(state.cursor.anchor));
      const h = abs(Y.createRelativePositionFromJSON(state.cursor.head));
      if (a !== h) {
        marks.push({ at: Math.min(a, h), kind: "start", user: state.user });
        marks.push({ at: Math.max(a, h), kind: "end", user: state.user });
      }
      marks.push({ at: h, kind: "caret", user: state.user });
    }
    marks.sort((x, y) => x.at - y.at || (x.kind === "end" ? -1 : 1));
    overlay.replaceChildren();
    let pos = 0;
    /** @type {HTMLElement} */
    let into = overlay;
    for (const m of marks) {
      into.append(text.slice(pos, m.at));
      pos = m.at;
      if (m.kind === "start") {
        const span = document.createElement("span");
        span.className = "sel";
        span.style.background = translucent(m.user.color);
        overlay.append(span);
        into = span;
      } else if (m.kind === "end") {
        into = overlay;
      } else {
        const caret = document.createElement("span");
        caret.className = "caret";
        caret.style.borderColor = m.user.color;
        caret.dataset.user = m.user.name;
        const label = document.createElement("span");
        label.className = "label";
        label.style.background = m.user.color;
        label.textContent = m.user.name;
        caret.append(label);
        into.append(caret);
      }
    }
    into.append(text.slice(pos) + "\n");
    overlay.scrollTop = area.scrollTop;
    usersEl.replaceChildren(...names.map((u) => {
      const li = document.createElement("li");
      li.textContent = u.me ? `${u.name} (you)` : u.name;
      li.style.color = u.color;
      li.title = u.name;
      li.dataset.user = u.name;
      return li;
    }));
  }
  awareness.on("change", render);
  area.addEventListener("scroll", () => { overlay.scrollTop = area.scrollTop; });
  area.addEventListener("input", render);
  render();
}

/** A user's colour at 25% for a selection: "#rrggbb" (identity.js) or an older client's "hsl(...)". */
function translucent(/** @type {string} */ color) {
  return /^#[0-9a-f]{6}$/i.test(color) ? `${color}40` : color.replace(")", " / 25%)");
}

main();
