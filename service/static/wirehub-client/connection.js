// The connection half of the client: open, keep alive (pings, token refresh), reconnect with the
// server's close policy, and correlate requests with their replies. WirehubClient (client.js) adds
// the rooms on top: what a frame means, and rejoining after a reconnect.
import { CloseCode, SUBPROTOCOL, WirehubError, backoffDelay, closePolicy } from "./policy.js";

/** @typedef {import("./types.js").ClientOptions} ClientOptions */
/** @typedef {"idle" | "connecting" | "open" | "reconnecting" | "closed" | "stopped"} Status */

/**
 * @typedef {object} Pending a request waiting for its reply
 * @property {(v: any) => void} resolve
 * @property {(e: any) => void} reject
 * @property {any} timer
 * @property {boolean} sent
 * @property {any} frame
 * @property {((reply: any) => void) | undefined} onReply
 */

/** One connection to one wirehub endpoint, kept alive; the base of WirehubClient. */
export class Connection {
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
    /** @type {Status} */
    this.status = "idle";
    /** @type {any} the last welcome frame */
    this.welcome = null;
    /** connections opened so far (1 + reconnects) */
    this.connections = 0;
    /** @type {{code: number, reason: string} | null} */
    this.lastClose = null;
    this._ws = /** @type {any} */ (null);
    this._ready = false;
    this._attempt = 0;
    this._nextId = 1;
    /** @type {Map<string, Pending>} */
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
    // Joins in the upgrade URL (docs/protocol.md, "Joining in the upgrade URL"): the rooms known at connect
    // time are (re)joined without a join frame each. Off for good once a server ignores them (its welcome
    // announces none); one attempt goes without them after an attempt with them failed before opening (a
    // browser cannot tell a 400 for them from a network error).
    this._urlJoins = this.options.urlJoins !== false;
    this._skipUrlJoins = false;
    /** @type {Map<string, {id: string, reply: Promise<any>}>} the current attempt's URL joins, by room */
    this._urlJoined = new Map();
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

  /** @param {Status} status */
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
    for (const k of /** @type {Array<keyof Connection["_timers"]>} */ (Object.keys(this._timers))) {
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
    this._urlJoined = new Map();
    if (this._urlJoins && !this._skipUrlJoins) {
      for (const item of this._urlJoinItems()) {
        url += (url.includes("?") ? "&" : "?") + "join=" + encodeURIComponent(JSON.stringify(item));
      }
    }
    const withJoins = this._urlJoined.size > 0;
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
    ws.onopen = () => { opened = true; this._skipUrlJoins = false; };
    ws.onerror = () => {
      // Browsers follow an error with a close event; Node 20's WebSocket does not after a refused
      // handshake (HTTP 401, 503, ...), so a failure before the open is handled here.
      if (this._ws !== ws) return;
      if (!opened) {
        if (withJoins) this._skipUrlJoins = true; // maybe a 400 for them: the next attempt joins with frames
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
      const p = /** @type {Pending} */ (this._pending.get(String(id)));
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
    if (frame.op === "welcome") this._onWelcome(frame);
    else if (frame.op === "error") this._emit("error", new WirehubError(frame.code, frame.message, frame));
    else this._dispatch(frame);
  }

  /**
   * A frame that is neither a reply nor a welcome nor an error: WirehubClient handles them.
   * @param {any} _frame
   */
  _dispatch(_frame) {}

  /** Rejoin what was joined, after a (re)connect and before anything queued goes out. */
  async _rejoin() {}

  /**
   * The joins to put in the next upgrade URL (WirehubClient's rooms), each registered with _expectReply.
   * @returns {Array<Record<string, any>>}
   */
  _urlJoinItems() { return []; }

  /**
   * Rooms left after this connection's URL was made: their URL joins went through on the server, so leave
   * them (else the server keeps this connection a member that the client no longer reads).
   */
  _leaveUrlJoinsLeft() {
    const left = [...this._urlJoined.entries()];
    this._urlJoined.clear();
    for (const [room, { reply }] of left) {
      reply.then((r) => (r?.op === "joined" ? this.request({ op: "leave", room }) : undefined)).catch(() => {});
    }
  }

  /**
   * A reply to a request this side did not send (a join of the upgrade URL), awaited like one.
   * @param {string} room @param {string} id @param {(reply: any) => void} [onReply]
   */
  _expectReply(room, id, onReply) {
    const reply = new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._pending.delete(id);
        reject(new WirehubError("timeout", `no reply to join within ${this.options.ackTimeout} ms`));
      }, this.options.connectTimeout + this.options.ackTimeout);
      this._pending.set(id, { resolve, reject, timer, sent: true, frame: null, onReply });
    });
    reply.catch(() => {}); // awaited only if a welcome comes
    this._urlJoined.set(room, { id, reply });
  }

  /**
   * The reply to the URL join of `room` on this connection, or undefined when the URL did not carry it.
   * @param {string} room
   * @returns {Promise<any> | undefined}
   */
  _takeUrlJoin(room) {
    const joined = this._urlJoined.get(room);
    this._urlJoined.delete(room);
    return joined?.reply;
  }

  /** @param {any} frame */
  async _onWelcome(frame) {
    this.welcome = frame;
    if (this._urlJoined.size && frame.joins !== this._urlJoined.size) {
      // a server that does not take joins in the URL: join with frames, now and after every reconnect
      this._debug("the server ignored the joins in the URL");
      this._urlJoins = false;
      for (const { id } of this._urlJoined.values()) {
        const p = this._pending.get(id);
        if (p) { clearTimeout(p.timer); this._pending.delete(id); }
      }
      this._urlJoined.clear();
    }
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
    await this._rejoin();
    this._leaveUrlJoinsLeft();
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
}

/** @param {string} url */
function resolveUrl(url) {
  const loc = /** @type {any} */ (globalThis).location;
  const u = new URL(url, loc ? loc.href : undefined);
  if (u.protocol === "http:") u.protocol = "ws:";
  else if (u.protocol === "https:") u.protocol = "wss:";
  return u.toString();
}
