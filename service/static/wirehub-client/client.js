// WirehubClient: a Connection (connection.js) with rooms: chat subscriptions with positions and
// presence, game rooms with their state, each rejoined after a reconnect.
import { Connection } from "./connection.js";
import { WirehubError } from "./policy.js";
import { GameRoom, Subscription, applyPresenceEvent, takePresenceSnapshot } from "./rooms.js";

/** @typedef {import("./types.js").ClientOptions} ClientOptions */
/** @typedef {import("./types.js").MessageFrame} MessageFrame */
/** @typedef {import("./types.js").JoinInfo} JoinInfo */
/** @typedef {import("./types.js").JoinOptions} JoinOptions */
/** @typedef {import("./types.js").Member} Member */

// Most joins one upgrade URL carries (the rest are join frames) and its longest query of joins: well below
// a server's max_rooms default (100) and the head limits of proxies.
const MAX_URL_JOINS = 20;
const MAX_URL_JOIN_CHARS = 4000;

/**
 * One connection to one wirehub endpoint (`/ws/chat` or `/ws/game`), kept alive.
 *
 * Events (`client.on(name, fn)`, returns an unsubscribe function):
 * `status` ("connecting" | "open" | "reconnecting" | "closed" | "stopped"),
 * `welcome` (the welcome frame), `joined` (JoinInfo, also after rejoins),
 * `close` ({code, reason, reconnect, delay}), `presence`, `gap`, `left`, `error` (WirehubError),
 * `refreshed` ({expires_at}), `frame` (every frame received).
 */
export class WirehubClient extends Connection {
  /**
   * @param {string} url `ws://host:8080/ws/chat`; in a browser a path (`/ws/chat`) or an http(s) URL works too
   * @param {ClientOptions} [options]
   */
  constructor(url, options = {}) {
    super(url, options);
    /** @type {Map<string, Subscription>} */
    this.rooms = new Map();
    /** @type {Map<string, GameRoom>} */
    this.games = new Map();
  }

  // -- frames ---------------------------------------------------------------------------------------

  /** @param {any} frame */
  _dispatch(frame) {
    switch (frame.op) {
      case "message":
        return this._onMessage(frame);
      case "presence.join":
      case "presence.leave":
      case "presence.diff": {
        const sub = this.rooms.get(frame.room);
        if (sub) {
          applyPresenceEvent(sub, frame);
          if (sub._reloading) sub._reloading.push(frame);
          else if (frame.op === "presence.diff" && frame.truncated) this._reloadMembers(sub);
        }
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

  /** @returns {Array<Record<string, any>>} */
  _urlJoinItems() {
    /** @type {Array<Record<string, any>>} */
    const items = [];
    let chars = 0;
    for (const room of [...this.rooms.values(), ...this.games.values()].slice(0, MAX_URL_JOINS)) {
      const id = "c" + this._nextId++;
      /** @type {Record<string, any>} */
      const item = { room: room.room, id };
      const sub = room instanceof Subscription ? room : null;
      if (sub?.position) item.since = sub.position;
      chars += JSON.stringify(item).length + 6;
      if (chars > MAX_URL_JOIN_CHARS) break;
      this._expectReply(room.room, id, sub ? (r) => onJoinedRead(sub, r) : undefined);
      items.push(item);
    }
    return items;
  }

  async _rejoin() {
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
    // joined in the upgrade URL: its reply follows the welcome
    const reply = await (this._takeUrlJoin(sub.room) ?? this.request(body, undefined, (r) => onJoinedRead(sub, r)));
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
   * @returns {Promise<Array<Member>>}
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
   * @returns {Promise<{members: Array<Member>, count: {users: number, connections: number}, cursor: string | null}>}
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
   * After a `truncated` diff the members known here may be stale (diffs were cut short, a replica died with some
   * unsent, or the server missed events while its link to the bus was down): the list starts again from the
   * room's first page, and the diffs that came while it was read are applied on top (each names users as they
   * were when it was sent, so the later one wins).
   * @param {Subscription} sub
   */
  async _reloadMembers(sub) {
    sub._reloading = [];
    try {
      const page = await this.presencePage(sub.room);
      const came = sub._reloading ?? [];
      sub._reloading = null;
      if (this.rooms.get(sub.room) !== sub) return; // left meanwhile
      const count = sub.count;
      sub.members = new Map(page.members.map((m) => [m.user, { ...m }]));
      sub.cursor = page.cursor;
      for (const diff of came) applyPresenceEvent(sub, diff);
      sub.count = count; // the page's, read after those diffs were sent
      if (came.some((diff) => diff.truncated)) this._reloadMembers(sub);
    } catch (err) {
      sub._reloading = null;
      this._debug("reloading the members after a truncated diff failed", String(err));
    }
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
    const reply = await (this._takeUrlJoin(game.room) ?? this.request({ op: "join", room: game.room }));
    game._state(reply, false);
  }
}

/**
 * The position after `joined`, as it is read: the replayed and live messages come right after it.
 * @param {Subscription} sub @param {any} r
 */
function onJoinedRead(sub, r) {
  if (!(r.recovered && sub.offset !== null && sub.epoch === r.epoch)) sub._move(r.offset, r.epoch);
}

export default WirehubClient;
