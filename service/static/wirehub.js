// wirehub.js: the wirehub client for browsers and Node 20+. An ES module with no dependencies.
//
//   import { WirehubClient } from "/static/wirehub.js";
//   const client = new WirehubClient("/ws/chat", { token: async () => fetchMyToken() });
//   await client.connect();
//   const lobby = await client.join("lobby", (msg) => console.log(msg.from, msg.data));
//   await client.publish("lobby", { text: "hi" });          // resolves with the ack {offset}
//
// What it does on top of the plain WebSocket protocol (docs/protocol.md, docs/clients.md):
// reconnects after a drop with exponential backoff and full jitter, honours the server's close
// codes and retry hints, rejoins every room with its last {offset, epoch} and reports per room
// whether the server `recovered` the messages missed meanwhile, refreshes the token before it
// expires, correlates replies (acks) with a timeout, and keeps game-room state in sync by
// applying JSON Patches (RFC 6902), resyncing on a version gap.

/**
 * @typedef {string | (() => (string | null | undefined | Promise<string | null | undefined>))} TokenSource
 *   A token, or a callback that fetches a fresh one (called again for a reconnect after 4001,
 *   after a failed handshake, and before the token expires).
 */

/**
 * @typedef {object} ClientOptions
 * @property {TokenSource} [token] no token = anonymous
 * @property {"subprotocol" | "query"} [tokenTransport] how the token travels on the upgrade:
 *   `Sec-WebSocket-Protocol: wirehub.v1, bearer.<token>` (default; kept out of URLs and logs) or
 *   the `token` query parameter
 * @property {any} [WebSocket] a WebSocket constructor (default: globalThis.WebSocket)
 * @property {number} [backoffMin] first reconnect delay ceiling in ms (default 500)
 * @property {number} [backoffMax] largest reconnect delay ceiling in ms (default 30000)
 * @property {number} [ackTimeout] ms a request waits for its reply (default 10000)
 * @property {number} [connectTimeout] ms a connection attempt may take (default 10000)
 * @property {number} [refreshMargin] refresh the token this many ms before it expires (default 30000)
 * @property {number} [pingInterval] ms between application pings that detect dead connections (default 25000; 0 = off)
 * @property {boolean} [reconnect] reconnect after a drop (default true)
 * @property {(msg: string, data?: any) => void} [debug] a logger for the client's decisions
 */

/**
 * @typedef {object} MessageFrame
 * @property {"message"} op
 * @property {string} room
 * @property {string} from user id of the sender ("server" for the HTTP publish API)
 * @property {any} data
 * @property {number} offset history offset within the room's epoch
 * @property {number} ts publish time, UNIX seconds
 */

/**
 * @typedef {object} JoinInfo
 * @property {string} room
 * @property {number} offset the newest offset in the room's history
 * @property {string} epoch
 * @property {boolean} recovered true when every message missed since the last position follows
 * @property {boolean} rejoin true when this is an automatic rejoin after a reconnect
 * @property {Array<{user: string, name?: string, connections: number}>} presence
 */

/**
 * @typedef {object} JoinOptions
 * @property {{offset: number, epoch: string}} [since] resume from a stored position
 * @property {(info: JoinInfo) => void} [onJoined] after the first join and after every rejoin
 * @property {(event: PresenceEvent) => void} [onPresence] presence.join / presence.leave / presence.diff, after
 *   the subscription's `members` and `count` were updated
 * @property {(event: {room: string, epoch?: string, offset?: number}) => void} [onGap] the server lost messages of this room; {epoch, offset} is the position the next messages continue
 * @property {(event: {room: string, reason?: string}) => void} [onLeft] the server left the room for this client
 *   (after a `refresh`, the new token no longer allows it); it is not rejoined
 */

/**
 * @typedef {object} PresenceEvent
 * @property {"presence.join" | "presence.leave" | "presence.diff"} op
 * @property {string} room
 * @property {string} [user] presence.join / presence.leave
 * @property {string} [name]
 * @property {Array<{user: string, name?: string}>} [joins] presence.diff
 * @property {string[]} [leaves] presence.diff
 * @property {{users: number, connections: number}} [count] presence.diff: the room's totals
 */

/** Close codes of docs/protocol.md. */
export const CloseCode = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  POLICY: 1008,
  TOO_BIG: 1009,
  INTERNAL: 1011,
  TOKEN_EXPIRED: 4001,
  FORBIDDEN: 4003,
  SLOW_CONSUMER: 4008,
  RATE_LIMITED: 4029,
});

const SUBPROTOCOL = "wirehub.v1";

/** A failed request: `code` is a server error code (`forbidden`, `not_joined`, ...) or one of
 * the client's own: `timeout`, `disconnected`, `closed`, `stopped`. */
export class WirehubError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {any} [frame] the server's error frame
   */
  constructor(code, message, frame) {
    super(message);
    this.name = "WirehubError";
    this.code = code;
    this.frame = frame;
  }
}

/**
 * Exponential backoff with full jitter: a uniform random delay in [0, min(max, base * 2^attempt)).
 * @param {number} attempt 0 for the first retry
 * @param {number} base
 * @param {number} max
 * @param {() => number} [random]
 */
export function backoffDelay(attempt, base, max, random = Math.random) {
  const ceiling = Math.min(max, base * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * ceiling);
}

/**
 * The reconnect hint of a close reason ("server going away; retry_ms=1234" -> 1234), or null.
 * @param {string | undefined} reason
 */
export function parseRetryMs(reason) {
  const m = /(?:^|;)\s*retry_ms=(\d+)/.exec(reason || "");
  return m ? Number(m[1]) : null;
}

/**
 * What the client does after the server closed with `code`.
 * @param {number} code
 * @param {string} reason
 * @param {number} attempt consecutive failed attempts so far
 * @param {{backoffMin: number, backoffMax: number, random?: () => number}} o
 * @returns {{reconnect: boolean, delay: number, newToken: boolean}}
 */
export function closePolicy(code, reason, attempt, o) {
  const hint = parseRetryMs(reason);
  const jitter = (/** @type {number} */ n) => backoffDelay(n, o.backoffMin, o.backoffMax, o.random);
  switch (code) {
    case CloseCode.FORBIDDEN:
      return { reconnect: false, delay: 0, newToken: false };
    case CloseCode.TOKEN_EXPIRED:
      return { reconnect: true, delay: jitter(Math.min(attempt, 1)), newToken: true };
    case CloseCode.GOING_AWAY:
    case CloseCode.SLOW_CONSUMER:
      return { reconnect: true, delay: hint ?? jitter(attempt), newToken: false };
    case CloseCode.RATE_LIMITED:
      // longer: the hint plus a backoff that starts 8x higher
      return { reconnect: true, delay: (hint ?? 0) + jitter(attempt + 3), newToken: false };
    default:
      return { reconnect: true, delay: jitter(attempt), newToken: false };
  }
}

// -- JSON Patch (RFC 6902) -------------------------------------------------------------------------------

/** @param {string} pointer */
function parsePointer(pointer) {
  if (pointer === "") return [];
  if (pointer[0] !== "/") throw new Error(`bad JSON pointer ${pointer}`);
  return pointer.slice(1).split("/").map((t) => t.replace(/~1/g, "/").replace(/~0/g, "~"));
}

/** @param {any} a @param {any} b @returns {boolean} */
function deepEqual(a, b) {
  if (a === b) return true;
  if (typeof a !== "object" || typeof b !== "object" || a === null || b === null) return false;
  if (Array.isArray(a) !== Array.isArray(b)) return false;
  const ka = Object.keys(a), kb = Object.keys(b);
  return ka.length === kb.length && ka.every((k) => Object.prototype.hasOwnProperty.call(b, k) && deepEqual(a[k], b[k]));
}

/** @param {any} v */
const clone = (v) => (v === undefined ? undefined : JSON.parse(JSON.stringify(v)));

/**
 * Apply a JSON Patch to `doc` and return the result (`doc` itself is changed where possible).
 * Throws on an operation that does not apply.
 * @param {any} doc
 * @param {Array<{op: string, path: string, value?: any, from?: string}>} patch
 */
export function applyPatch(doc, patch) {
  for (const op of patch) doc = applyOp(doc, op);
  return doc;
}

/** @param {any} doc @param {{op: string, path: string, value?: any, from?: string}} op */
function applyOp(doc, op) {
  const tokens = parsePointer(op.path);
  if (op.op === "test") {
    if (!deepEqual(getAt(doc, tokens), op.value)) throw new Error(`test failed at ${op.path}`);
    return doc;
  }
  let value;
  if (op.op === "add" || op.op === "replace") value = clone(op.value);
  else if (op.op === "copy" || op.op === "move") {
    const from = parsePointer(/** @type {string} */ (op.from));
    value = clone(getAt(doc, from));
    if (op.op === "move") doc = removeAt(doc, from);
  } else if (op.op === "remove") return removeAt(doc, tokens);
  else throw new Error(`unknown patch op ${op.op}`);
  if (tokens.length === 0) return value;
  const parent = getAt(doc, tokens.slice(0, -1));
  const key = tokens[tokens.length - 1];
  if (Array.isArray(parent)) {
    const i = key === "-" ? parent.length : Number(key);
    if (!Number.isInteger(i) || i < 0 || i > parent.length) throw new Error(`bad index at ${op.path}`);
    if (op.op === "replace") {
      if (i >= parent.length) throw new Error(`no element at ${op.path}`);
      parent[i] = value;
    } else parent.splice(i, 0, value);
  } else if (parent !== null && typeof parent === "object") {
    if (op.op === "replace" && !(key in parent)) throw new Error(`no member at ${op.path}`);
    parent[key] = value;
  } else throw new Error(`no container at ${op.path}`);
  return doc;
}

/** @param {any} doc @param {string[]} tokens */
function getAt(doc, tokens) {
  let cur = doc;
  for (const t of tokens) {
    if (cur === null || typeof cur !== "object" || !(Array.isArray(cur) ? Number(t) < cur.length : t in cur)) {
      throw new Error(`no value at /${tokens.join("/")}`);
    }
    cur = cur[Array.isArray(cur) ? Number(t) : t];
  }
  return cur;
}

/** @param {any} doc @param {string[]} tokens */
function removeAt(doc, tokens) {
  if (tokens.length === 0) return undefined;
  const parent = getAt(doc, tokens.slice(0, -1));
  const key = tokens[tokens.length - 1];
  if (Array.isArray(parent)) {
    const i = Number(key);
    if (!Number.isInteger(i) || i < 0 || i >= parent.length) throw new Error(`no element at /${tokens.join("/")}`);
    parent.splice(i, 1);
  } else if (parent !== null && typeof parent === "object" && key in parent) delete parent[key];
  else throw new Error(`no member at /${tokens.join("/")}`);
  return doc;
}

// -- the client ------------------------------------------------------------------------------------------

/** A joined chat room. */
export class Subscription {
  /**
   * @param {WirehubClient} client
   * @param {string} room
   * @param {(msg: MessageFrame) => void} onMessage
   * @param {JoinOptions} options
   */
  constructor(client, room, onMessage, options) {
    this.client = client;
    this.room = room;
    this.onMessage = onMessage;
    this.options = options;
    /** @type {number | null} offset of the last message received */
    this.offset = options.since ? options.since.offset : null;
    /** @type {string | null} */
    this.epoch = options.since ? options.since.epoch : null;
    /** @type {boolean | null} whether the last (re)join recovered every missed message */
    this.recovered = null;
    /** @type {JoinInfo["presence"]} */
    this.presence = [];
    /** @type {{users: number, connections: number} | null} the room's totals (null: unknown, or presence off) */
    this.count = null;
    /** @type {string | null} where `presencePage` goes on from joined's list (null: it listed everyone) */
    this.cursor = null;
    /** @type {Map<string, {user: string, name?: string, connections: number}>} members known here, by user */
    this.members = new Map();
    /** offsets of this client's own publishes, not given to onMessage when history replays them */
    /** @type {Set<number>} */
    this.own = new Set();
  }

  /** The position to store for a later `join(room, fn, {since})`, or null. */
  get position() {
    return this.offset !== null && this.epoch !== null ? { offset: this.offset, epoch: this.epoch } : null;
  }

  /**
   * Take a position the server named: within an epoch it only moves forward (a message already
   * given to onMessage is never asked for again); another epoch starts over.
   * @param {any} offset @param {any} epoch
   */
  _move(offset, epoch) {
    const next = Number.isInteger(offset) ? offset : null;
    if (epoch !== this.epoch) {
      this.offset = next;
      this.epoch = typeof epoch === "string" ? epoch : null;
      this.own.clear(); // offsets of another epoch
    } else if (next !== null && (this.offset === null || next > this.offset)) {
      this.offset = next;
      for (const o of this.own) if (o <= next) this.own.delete(o);
    }
  }

  /** Publish to this room (see WirehubClient.publish). @param {any} data */
  publish(data, options = {}) {
    return this.client.publish(this.room, data, options);
  }

  leave() {
    return this.client.leave(this.room);
  }
}

/** A joined game room: `state` follows the server's document, patch by patch. */
export class GameRoom {
  /**
   * @param {WirehubClient} client
   * @param {string} room
   * @param {(state: any, info: {version: number, by?: string[], resync: boolean}) => void} [onChange]
   */
  constructor(client, room, onChange) {
    this.client = client;
    this.room = room;
    this.onChange = onChange;
    /** @type {any} */
    this.state = null;
    this.version = 0;
    /** how many times the state was reloaded after a gap */
    this.resyncs = 0;
    /** @type {Promise<void> | null} */
    this._syncing = null;
  }

  /**
   * Send a JSON Patch; resolves with {version} once the server committed it (the `patch` event
   * that applies it to `state` arrives separately, to every member, this client included).
   * @param {Array<{op: string, path: string, value?: any, from?: string}>} patch
   * @param {{timeout?: number}} [options]
   * @returns {Promise<{version: number}>}
   */
  async update(patch, options = {}) {
    const reply = await this.client.request({ op: "update", room: this.room, patch }, options.timeout);
    return { version: reply.version };
  }

  /** Reload the whole state from the server. */
  sync() {
    if (!this._syncing) {
      this._syncing = this.client
        .request({ op: "sync", room: this.room })
        .then((frame) => this._state(frame, true))
        .catch((err) => this.client._emit("error", err))
        .finally(() => { this._syncing = null; });
    }
    return this._syncing;
  }

  leave() {
    return this.client.leave(this.room);
  }

  /** @param {any} frame @param {boolean} resync */
  _state(frame, resync) {
    this.state = frame.state;
    this.version = frame.version;
    if (resync) this.resyncs += 1;
    this.onChange?.(this.state, { version: this.version, resync });
  }

  /** @param {any} frame */
  _patch(frame) {
    if (this._syncing) return; // the state being fetched includes it
    if (frame.version <= this.version) return; // already applied
    const from = frame.from_version ?? frame.version;
    if (from !== this.version + 1) {
      this.client._debug("game version gap: resync", { room: this.room, have: this.version, from });
      this.sync();
      return;
    }
    try {
      this.state = applyPatch(this.state, frame.patch);
    } catch (err) {
      this.client._debug("patch does not apply: resync", { room: this.room, err: String(err) });
      this.sync();
      return;
    }
    this.version = frame.version;
    this.onChange?.(this.state, { version: this.version, by: frame.by, resync: false });
  }
}

/**
 * One connection to one wirehub endpoint (`/ws/chat` or `/ws/game`), kept alive.
 *
 * Events (`client.on(name, fn)`, returns an unsubscribe function):
 * `status` ("connecting" | "open" | "reconnecting" | "closed" | "stopped"),
 * `welcome` (the welcome frame), `joined` (JoinInfo, also after rejoins),
 * `close` ({code, reason, reconnect, delay}), `presence`, `gap`, `left`, `error` (WirehubError),
 * `refreshed` ({expires_at}), `frame` (every frame received).
 */
export class WirehubClient {
  /**
   * @param {string} url `ws://host:8080/ws/chat`; in a browser a path (`/ws/chat`) or an http(s) URL works too
   * @param {ClientOptions} [options]
   */
  constructor(url, options = {}) {
    this.url = resolveUrl(url);
    this.options = {
      tokenTransport: "subprotocol",
      backoffMin: 500,
      backoffMax: 30000,
      ackTimeout: 10000,
      connectTimeout: 10000,
      refreshMargin: 30000,
      pingInterval: 25000,
      reconnect: true,
      ...options,
    };
    this.WebSocket = options.WebSocket || globalThis.WebSocket;
    if (!this.WebSocket) {
      throw new Error("no WebSocket: pass {WebSocket} (Node 20 needs --experimental-websocket or the 'ws' package)");
    }
    /** @type {"idle" | "connecting" | "open" | "reconnecting" | "closed" | "stopped"} */
    this.status = "idle";
    /** @type {any} the last welcome frame */
    this.welcome = null;
    /** @type {Map<string, Subscription>} */
    this.rooms = new Map();
    /** @type {Map<string, GameRoom>} */
    this.games = new Map();
    /** connections opened so far (1 + reconnects) */
    this.connections = 0;
    /** @type {{code: number, reason: string} | null} */
    this.lastClose = null;
    this._ws = /** @type {any} */ (null);
    this._ready = false;
    this._attempt = 0;
    this._nextId = 1;
    /** @type {Map<string, {resolve: (v: any) => void, reject: (e: any) => void, timer: any, sent: boolean, frame: any}>} */
    this._pending = new Map();
    /** @type {Array<string>} ids of requests waiting for the connection */
    this._queue = [];
    /** @type {Map<string, Set<Function>>} */
    this._handlers = new Map();
    this._token = typeof options.token === "string" ? options.token : null;
    this._tokenStale = typeof options.token === "function";
    this._timers = { reconnect: /** @type {any} */ (null), refresh: /** @type {any} */ (null), ping: /** @type {any} */ (null), connect: /** @type {any} */ (null) };
    /** @type {{resolve: () => void, reject: (e: any) => void, promise: Promise<void>} | null} */
    this._opened = null;
    this._stopped = false;
    this._opening = false;
  }

  // -- events ---------------------------------------------------------------------------------------

  /**
   * @param {string} name
   * @param {(arg: any) => void} fn
   * @returns {() => void} unsubscribe
   */
  on(name, fn) {
    let set = this._handlers.get(name);
    if (!set) this._handlers.set(name, (set = new Set()));
    set.add(fn);
    return () => set.delete(fn);
  }

  /** @param {string} name @param {any} arg */
  _emit(name, arg) {
    for (const fn of this._handlers.get(name) || []) {
      try { fn(arg); } catch (err) { console.error(`wirehub: a ${name} handler failed`, err); }
    }
  }

  /** @param {string} msg @param {any} [data] */
  _debug(msg, data) {
    this.options.debug?.(msg, data);
  }

  /** @param {WirehubClient["status"]} status */
  _setStatus(status) {
    if (this.status === status) return;
    this.status = status;
    this._emit("status", status);
  }

  // -- connecting -----------------------------------------------------------------------------------

  /**
   * Connect (and keep reconnecting). Resolves once the first connection is open and its rooms
   * are joined; rejects only when the server refuses for good (4003) or close() is called.
   * @returns {Promise<void>}
   */
  connect() {
    if (this._stopped) {
      return Promise.reject(new WirehubError(this.status === "stopped" ? "stopped" : "closed", `the client is ${this.status}`));
    }
    if (this._ready) return Promise.resolve();
    if (!this._opened) {
      /** @type {any} */
      const d = {};
      d.promise = new Promise((resolve, reject) => { d.resolve = resolve; d.reject = reject; });
      d.promise.catch(() => {}); // the caller may not await it
      this._opened = d;
      if (!this._ws && !this._timers.reconnect && !this._opening) this._open();
    }
    return /** @type {Promise<void>} */ (this._opened?.promise);
  }

  /** Close for good: no reconnect; pending requests fail with `closed`. */
  close() {
    this._stopped = true;
    this._clearTimers();
    const ws = this._ws;
    this._ws = null;
    this._ready = false;
    if (ws) {
      try { ws.close(1000); } catch { /* already closed */ }
    }
    this._failAll("closed", "the client was closed", true);
    this._opened?.reject(new WirehubError("closed", "the client was closed"));
    this._opened = null;
    this._setStatus("closed");
  }

  _clearTimers() {
    for (const k of /** @type {Array<keyof WirehubClient["_timers"]>} */ (Object.keys(this._timers))) {
      clearTimeout(this._timers[k]);
      clearInterval(this._timers[k]);
      this._timers[k] = null;
    }
  }

  async _token_() {
    const source = this.options.token;
    if (typeof source !== "function") return this._token;
    if (this._tokenStale || !this._token) {
      this._token = (await source()) || null;
      this._tokenStale = false;
    }
    return this._token;
  }

  async _open() {
    if (this._stopped || this._opening) return;
    this._timers.reconnect = null;
    this._opening = true;
    try {
      await this._openSocket();
    } finally {
      this._opening = false;
    }
  }

  async _openSocket() {
    this._setStatus(this.connections === 0 && this._attempt === 0 ? "connecting" : "reconnecting");
    let token;
    try {
      token = await this._token_();
    } catch (err) {
      this._debug("token callback failed", String(err));
      this._emit("error", new WirehubError("token", `the token callback failed: ${err}`));
      this._tokenStale = true;
      this._scheduleReconnect(backoffDelay(this._attempt++, this.options.backoffMin, this.options.backoffMax));
      return;
    }
    if (this._stopped) return;
    let url = this.url;
    const protocols = [SUBPROTOCOL];
    if (token) {
      if (this.options.tokenTransport === "query") {
        url += (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token);
      } else {
        protocols.push("bearer." + token);
      }
    }
    let ws;
    try {
      ws = new this.WebSocket(url, protocols);
    } catch (err) {
      this._emit("error", new WirehubError("connect", String(err)));
      this._scheduleReconnect(backoffDelay(this._attempt++, this.options.backoffMin, this.options.backoffMax));
      return;
    }
    this._ws = ws;
    let welcomed = false;
    this._timers.connect = setTimeout(() => {
      if (this._ws === ws && !welcomed) {
        this._debug("connect timeout");
        this._onClose(ws, 1006, "connect timeout", false);
        try { ws.close(); } catch { /* ignore */ }
      }
    }, this.options.connectTimeout);
    ws.onmessage = (/** @type {{data: any}} */ ev) => {
      if (this._ws !== ws) return;
      let frame;
      try { frame = JSON.parse(typeof ev.data === "string" ? ev.data : String(ev.data)); } catch { return; }
      if (frame && frame.op === "welcome") {
        welcomed = true;
        clearTimeout(this._timers.connect);
      }
      this._onFrame(frame);
    };
    ws.onclose = (/** @type {{code: number, reason: string}} */ ev) => {
      if (this._ws === ws) this._onClose(ws, ev.code, ev.reason || "", welcomed);
    };
    let opened = false;
    ws.onopen = () => { opened = true; };
    ws.onerror = () => {
      // Browsers follow an error with a close event; Node 20's WebSocket does not after a refused
      // handshake (HTTP 401, 503, ...), so a failure before the open is handled here.
      if (this._ws !== ws) return;
      if (!opened) {
        this._onClose(ws, 1006, "connection failed", false);
        try { ws.close(); } catch { /* ignore */ }
      } else {
        setTimeout(() => { if (this._ws === ws) this._onClose(ws, 1006, "connection error", welcomed); }, 1000);
      }
    };
  }

  /** @param {any} ws @param {number} code @param {string} reason @param {boolean} welcomed */
  _onClose(ws, code, reason, welcomed) {
    this._ws = null;
    this._ready = false;
    clearTimeout(this._timers.connect);
    clearTimeout(this._timers.refresh);
    clearInterval(this._timers.ping);
    this.lastClose = { code, reason };
    // Sent requests may or may not have happened: the caller decides (a queued one still waits).
    this._failAll("disconnected", `connection closed (${code})`, false);
    if (this._stopped) return;
    const policy = closePolicy(code, reason, this._attempt, this.options);
    if (!welcomed && typeof this.options.token === "function") policy.newToken = true; // maybe a 401
    const reconnect = policy.reconnect && this.options.reconnect;
    this._debug("closed", { code, reason, ...policy });
    this._emit("close", { code, reason, reconnect, delay: policy.delay });
    if (!reconnect) {
      this._stopped = code === CloseCode.FORBIDDEN;
      const why = this._stopped ? "stopped" : "closed";
      this._failAll(why, `closed by the server (${code} ${reason})`, true);
      this._opened?.reject(new WirehubError(why, `closed by the server (${code} ${reason})`));
      this._opened = null;
      this._setStatus(code === CloseCode.FORBIDDEN ? "stopped" : "closed");
      return;
    }
    if (policy.newToken) this._tokenStale = true;
    this._attempt += 1;
    this._setStatus("reconnecting");
    this._scheduleReconnect(policy.delay);
  }

  /** @param {number} delay */
  _scheduleReconnect(delay) {
    if (this._stopped) return;
    this._debug("reconnect in", delay);
    this._timers.reconnect = setTimeout(() => this._open(), delay);
  }

  /** @param {any} frame */
  _onFrame(frame) {
    this._emit("frame", frame);
    const id = frame.id;
    if (id !== undefined && this._pending.has(String(id))) {
      const p = /** @type {any} */ (this._pending.get(String(id)));
      if (p.sent) {
        this._pending.delete(String(id));
        clearTimeout(p.timer);
        if (frame.op === "error") p.reject(new WirehubError(frame.code, frame.message, frame));
        else {
          p.onReply?.(frame); // now: the frames after this one may be handled before the awaiter resumes
          p.resolve(frame);
        }
        return;
      }
    }
    switch (frame.op) {
      case "welcome":
        return this._onWelcome(frame);
      case "message":
        return this._onMessage(frame);
      case "presence.join":
      case "presence.leave":
      case "presence.diff": {
        const sub = this.rooms.get(frame.room);
        if (sub) applyPresenceEvent(sub, frame);
        sub?.options.onPresence?.(frame);
        this._emit("presence", frame);
        return;
      }
      case "gap": {
        const sub = this.rooms.get(frame.room);
        if (sub) {
          if (Number.isInteger(frame.offset)) sub._move(frame.offset, frame.epoch);
          else { sub.offset = null; sub.epoch = frame.epoch ?? null; } // a server whose gap has no offset
          sub.options.onGap?.(frame);
        }
        this._emit("gap", frame);
        return;
      }
      case "state": {
        const game = this.games.get(frame.room);
        if (game) game._state(frame, true);
        return;
      }
      case "patch":
        this.games.get(frame.room)?._patch(frame);
        return;
      case "left": {
        // the server left a room for us (a refreshed token no longer allows it): no rejoin
        const sub = this.rooms.get(frame.room);
        this.rooms.delete(frame.room);
        this.games.delete(frame.room);
        sub?.options.onLeft?.(frame);
        this._emit("left", frame);
        return;
      }
      case "error":
        this._emit("error", new WirehubError(frame.code, frame.message, frame));
        return;
      default:
        return;
    }
  }

  /** @param {MessageFrame} frame */
  _onMessage(frame) {
    const sub = this.rooms.get(frame.room);
    if (!sub) return;
    if (typeof frame.offset === "number") {
      if (sub.offset !== null && frame.offset <= sub.offset) return; // replayed twice
      sub.offset = frame.offset;
      if (sub.own.delete(frame.offset)) return; // our own publish, replayed by a recovery
      for (const o of sub.own) if (o < frame.offset) sub.own.delete(o);
    }
    try { sub.onMessage(frame); } catch (err) { console.error("wirehub: onMessage failed", err); }
  }

  /** @param {any} frame */
  async _onWelcome(frame) {
    this.welcome = frame;
    this.connections += 1;
    this._emit("welcome", frame);
    this._scheduleRefresh(frame.expires_at);
    if (this.options.pingInterval > 0) {
      const ws = this._ws;
      this._timers.ping = setInterval(() => {
        if (this._ws !== ws || !this._ready) return;
        this.request({ op: "ping" }, Math.min(this.options.ackTimeout, this.options.pingInterval)).catch((err) => {
          if (err.code === "timeout" && this._ws === ws) {
            this._debug("ping timeout: reconnecting");
            this._onClose(ws, 1006, "ping timeout", true);
            try { ws.close(4000, "ping timeout"); } catch { /* ignore */ }
          }
        });
      }, this.options.pingInterval);
    }
    const ws = this._ws;
    // Rejoin every room before anything queued goes out (a publish needs its room joined).
    await Promise.all([
      ...[...this.rooms.values()].map((sub) => this._join(sub, sub.recovered !== null).catch((err) => {
        if (err.code === "disconnected") return;
        this.rooms.delete(sub.room);
        this._emit("error", err);
      })),
      ...[...this.games.values()].map((game) => this._joinGame(game).catch((err) => {
        if (err.code === "disconnected") return;
        this.games.delete(game.room);
        this._emit("error", err);
      })),
    ]);
    if (this._ws !== ws || !ws) return;
    this._ready = true;
    this._attempt = 0;
    this._setStatus("open");
    this._opened?.resolve();
    this._opened = null;
    for (const id of this._queue.splice(0)) this._send(id);
  }

  /** @param {number | undefined} expiresAt UNIX seconds */
  _scheduleRefresh(expiresAt) {
    clearTimeout(this._timers.refresh);
    if (!expiresAt || typeof this.options.token !== "function") return;
    const left = expiresAt * 1000 - Date.now();
    const delay = Math.max(1000, Math.min(left - this.options.refreshMargin, left * 0.8));
    const ws = this._ws;
    this._timers.refresh = setTimeout(() => this._refresh(ws), delay);
  }

  /** @param {any} ws */
  async _refresh(ws) {
    if (this._ws !== ws || this._stopped) return;
    try {
      this._tokenStale = true;
      const token = await this._token_();
      if (!token) throw new WirehubError("token", "the token callback returned nothing");
      const reply = await this.request({ op: "refresh", token });
      this._debug("token refreshed", reply.expires_at);
      this._emit("refreshed", { expires_at: reply.expires_at });
      if (this._ws === ws) this._scheduleRefresh(reply.expires_at);
    } catch (err) {
      this._emit("error", err);
      // try again later; if the token runs out first, the server closes with 4001 and we reconnect
      if (this._ws === ws) this._timers.refresh = setTimeout(() => this._refresh(ws), 5000);
    }
  }

  // -- requests -------------------------------------------------------------------------------------

  /**
   * Send `{op, ...}` with a fresh id and resolve with the reply carrying it (reject with a
   * WirehubError on an `error` reply or after `timeout` ms). While disconnected the request waits
   * for the next connection (its timeout runs meanwhile).
   * @param {Record<string, any>} body
   * @param {number} [timeout]
   * @param {(reply: any) => void} [onReply] internal: runs as the reply is read, before later frames
   * @returns {Promise<any>}
   */
  request(body, timeout, onReply) {
    if (this._stopped) {
      return Promise.reject(new WirehubError(this.status === "stopped" ? "stopped" : "closed", `the client is ${this.status}`));
    }
    const id = "c" + this._nextId++;
    const frame = { ...body, id };
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(id);
        const i = this._queue.indexOf(id);
        if (i >= 0) this._queue.splice(i, 1);
        reject(new WirehubError("timeout", `no reply to ${body.op} within ${timeout ?? this.options.ackTimeout} ms`));
      }, timeout ?? this.options.ackTimeout);
      this._pending.set(id, { resolve, reject, timer, sent: false, frame, onReply });
      const internal = body.op === "join" || body.op === "ping" || body.op === "refresh";
      if (this._ws && (this._ready || internal) && this._ws.readyState === 1) this._send(id);
      else this._queue.push(id);
      if (!this._ws && !this._timers.reconnect && !this._opening && !this._opened && this.status === "idle") this.connect();
    });
  }

  /** @param {string} id */
  _send(id) {
    const p = this._pending.get(id);
    if (!p) return;
    try {
      this._ws.send(JSON.stringify(p.frame));
      p.sent = true;
    } catch {
      this._queue.push(id);
    }
  }

  /** @param {string} code @param {string} message @param {boolean} queuedToo */
  _failAll(code, message, queuedToo) {
    for (const [id, p] of [...this._pending]) {
      if (!p.sent && !queuedToo) continue;
      this._pending.delete(id);
      clearTimeout(p.timer);
      p.reject(new WirehubError(code, message));
    }
    if (queuedToo) this._queue.length = 0;
    else this._queue = this._queue.filter((id) => this._pending.has(id));
  }

  // -- chat -----------------------------------------------------------------------------------------

  /**
   * Join a chat room. `onMessage` gets every `message` of the room once, in order, including the
   * ones a rejoin recovers. Resolves with the Subscription after the server's `joined`.
   * @param {string} room
   * @param {(msg: MessageFrame) => void} onMessage
   * @param {JoinOptions} [options]
   * @returns {Promise<Subscription>}
   */
  async join(room, onMessage, options = {}) {
    if (this.rooms.has(room)) throw new WirehubError("bad_request", `already joined room ${room}`);
    const sub = new Subscription(this, room, onMessage, options);
    this.rooms.set(room, sub);
    if (!this._ready) {
      // the welcome handler joins every room in this.rooms
      try {
        await this.connect();
      } catch (err) {
        this.rooms.delete(room);
        throw err;
      }
      if (sub.recovered !== null) return sub;
    }
    try {
      await this._join(sub, false);
    } catch (err) {
      if (/** @type {any} */ (err).code === "disconnected" && this.options.reconnect && this.rooms.get(room) === sub) {
        await this._awaitRejoin(sub); // the next connection joins every room in this.rooms
        return sub;
      }
      if (this.rooms.get(room) === sub) this.rooms.delete(room);
      throw err;
    }
    return sub;
  }

  /** Wait until `sub` is joined by the rejoin after a reconnect (bounded by ackTimeout).
   * @param {Subscription} sub */
  _awaitRejoin(sub) {
    if (this._stopped) return Promise.reject(new WirehubError(this.status === "stopped" ? "stopped" : "closed", "the client stopped"));
    return new Promise((resolve, reject) => {
      const offs = [
        this.on("joined", (info) => { if (info.room === sub.room) { done(); resolve(undefined); } }),
        this.on("error", (err) => { if (this.rooms.get(sub.room) !== sub) { done(); reject(err); } }),
        this.on("status", (s) => {
          if (s === "stopped" || s === "closed") { done(); reject(new WirehubError(s, `the client is ${s}`)); }
        }),
      ];
      const timer = setTimeout(() => {
        done();
        if (this.rooms.get(sub.room) === sub) this.rooms.delete(sub.room);
        reject(new WirehubError("timeout", `could not join ${sub.room} within ${this.options.ackTimeout} ms`));
      }, this.options.ackTimeout);
      const done = () => { clearTimeout(timer); for (const off of offs) off(); };
    });
  }

  /** @param {Subscription} sub @param {boolean} rejoin */
  async _join(sub, rejoin) {
    /** @type {Record<string, any>} */
    const body = { op: "join", room: sub.room };
    if (sub.position) body.since = sub.position;
    const reply = await this.request(body, undefined, (r) => {
      // the position after `joined`, as it is read: the replayed and live messages come right after it
      if (!(r.recovered && sub.offset !== null && sub.epoch === r.epoch)) sub._move(r.offset, r.epoch);
    });
    sub.recovered = reply.recovered;
    sub.presence = reply.presence || [];
    takePresenceSnapshot(sub, reply);
    /** @type {JoinInfo} */
    const info = { room: sub.room, offset: reply.offset, epoch: reply.epoch, recovered: reply.recovered, rejoin, presence: sub.presence };
    this._emit("joined", info);
    sub.options.onJoined?.(info);
  }

  /**
   * Leave a room (chat or game): no rejoin after a reconnect.
   * @param {string} room
   */
  async leave(room) {
    const had = this.rooms.delete(room) || this.games.delete(room);
    if (had && this._ready) {
      try {
        await this.request({ op: "leave", room });
      } catch (err) {
        if (/** @type {any} */ (err).code !== "not_joined") throw err;
      }
    }
  }

  /**
   * Publish `data` to a joined room. Resolves with the server's ack `{offset}` (everyone else
   * in the room gets the message); rejects with a WirehubError on an error reply, on timeout, or
   * when the connection dropped before the ack (`disconnected`: it may or may not have been sent).
   * @param {string} room
   * @param {any} data
   * @param {{timeout?: number}} [options]
   * @returns {Promise<{offset: number}>}
   */
  async publish(room, data, options = {}) {
    const reply = await this.request({ op: "publish", room, data }, options.timeout);
    const sub = this.rooms.get(room);
    if (sub && typeof reply.offset === "number" && (sub.offset === null || reply.offset > sub.offset)) {
      sub.own.add(reply.offset);
    }
    return { offset: reply.offset };
  }

  /**
   * Who is in a room: one entry per user, in user order; the first page (the server's
   * `presence_limit`) or the one after `after` (see presencePage for the cursor and count).
   * @param {string} room
   * @param {{after?: string, limit?: number}} [options]
   * @returns {Promise<Array<{user: string, name?: string, connections: number}>>}
   */
  async presence(room, options = {}) {
    return (await this.presencePage(room, options)).members;
  }

  /**
   * A page of a room's members: `{members, count, cursor}`; pass `cursor` back as `after` for the
   * next page (`cursor` is null on the last one). Start from `subscription.cursor` to continue
   * after the list `joined` gave.
   * @param {string} room
   * @param {{after?: string, limit?: number}} [options]
   * @returns {Promise<{members: Array<{user: string, name?: string, connections: number}>, count: {users: number, connections: number}, cursor: string | null}>}
   */
  async presencePage(room, options = {}) {
    /** @type {Record<string, any>} */
    const body = { op: "presence", room };
    if (options.after !== undefined) body.after = options.after;
    if (options.limit !== undefined) body.limit = options.limit;
    const reply = await this.request(body);
    const sub = this.rooms.get(room);
    if (sub && reply.count) sub.count = { ...reply.count };
    return { members: reply.members, count: reply.count, cursor: reply.cursor ?? null };
  }

  /**
   * How many are in a room, without the list: `{users, connections}`.
   * @param {string} room
   * @returns {Promise<{users: number, connections: number}>}
   */
  async presenceCount(room) {
    const reply = await this.request({ op: "presence", room, count_only: true });
    const sub = this.rooms.get(room);
    if (sub) sub.count = { ...reply.count };
    return reply.count;
  }

  /**
   * A page of a room's history: the newest `limit` messages, or those after `since`.
   * @param {string} room
   * @param {{limit?: number, since?: {offset: number, epoch: string}}} [options]
   * @returns {Promise<{messages: MessageFrame[], offset: number, epoch: string, complete: boolean}>}
   */
  async history(room, options = {}) {
    /** @type {Record<string, any>} */
    const body = { op: "history", room };
    if (options.limit !== undefined) body.limit = options.limit;
    if (options.since !== undefined) body.since = options.since;
    const reply = await this.request(body);
    return { messages: reply.messages, offset: reply.offset, epoch: reply.epoch, complete: reply.complete };
  }

  // -- game -----------------------------------------------------------------------------------------

  /**
   * Join a game room (on a `/ws/game` connection): resolves with a GameRoom whose `state` and
   * `version` follow the server; `onChange(state, info)` runs after each change.
   * @param {string} room
   * @param {(state: any, info: {version: number, by?: string[], resync: boolean}) => void} [onChange]
   * @returns {Promise<GameRoom>}
   */
  async joinGame(room, onChange) {
    if (this.games.has(room)) throw new WirehubError("bad_request", `already joined room ${room}`);
    const game = new GameRoom(this, room, onChange);
    this.games.set(room, game);
    try {
      if (!this._ready) {
        await this.connect();
        if (game.version > 0 || game.state !== null) return game;
      }
      await this._joinGame(game);
    } catch (err) {
      this.games.delete(room);
      throw err;
    }
    return game;
  }

  /** @param {GameRoom} game */
  async _joinGame(game) {
    const reply = await this.request({ op: "join", room: game.room });
    game._state(reply, false);
  }
}

/** @param {string} url */
function resolveUrl(url) {
  const loc = /** @type {any} */ (globalThis).location;
  const u = new URL(url, loc ? loc.href : undefined);
  if (u.protocol === "http:") u.protocol = "ws:";
  else if (u.protocol === "https:") u.protocol = "wss:";
  return u.toString();
}

export default WirehubClient;

/**
 * The presence part of a `joined` reply: the first members, the count and the cursor.
 * @param {Subscription} sub
 * @param {Record<string, any>} joined
 */
export function takePresenceSnapshot(sub, joined) {
  sub.members = new Map((joined.presence || []).map((/** @type {any} */ m) => [m.user, { ...m }]));
  sub.count = joined.count ? { ...joined.count } : null;
  sub.cursor = typeof joined.cursor === "string" ? joined.cursor : null;
}

/**
 * Apply presence.join / presence.leave / presence.diff to `sub.members` and `sub.count`. A diff may
 * repeat a join `joined` already listed: applying is idempotent, and its `count` is the server's.
 * @param {Subscription} sub
 * @param {PresenceEvent} ev
 */
export function applyPresenceEvent(sub, ev) {
  if (ev.op === "presence.diff") {
    for (const user of ev.leaves || []) sub.members.delete(user);
    for (const j of ev.joins || []) sub.members.set(j.user, { connections: 1, ...j });
    if (ev.count) sub.count = { ...ev.count };
    return;
  }
  const user = /** @type {string} */ (ev.user);
  if (ev.op === "presence.join") {
    if (!sub.members.has(user) && sub.count) sub.count.users += 1;
    sub.members.set(user, ev.name ? { user, name: ev.name, connections: 1 } : { user, connections: 1 });
  } else {
    if (sub.count) sub.count.users = Math.max(0, sub.count.users - 1);
    sub.members.delete(user);
  }
}
