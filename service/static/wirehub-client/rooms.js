// The rooms a client has joined: a chat Subscription (position, presence) and a GameRoom (state, version).
import { applyPatch } from "./patch.js";

/** @typedef {import("./client.js").WirehubClient} WirehubClient */
/** @typedef {import("./types.js").MessageFrame} MessageFrame */
/** @typedef {import("./types.js").JoinInfo} JoinInfo */
/** @typedef {import("./types.js").JoinOptions} JoinOptions */
/** @typedef {import("./types.js").PresenceEvent} PresenceEvent */
/** @typedef {import("./types.js").Member} Member */

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
    /** @type {Map<string, Member>} members known here, by user */
    this.members = new Map();
    /** @type {PresenceEvent[] | null} while the list is reloaded (after a `truncated` diff): the diffs that came */
    this._reloading = null;
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
 * Apply presence.join / presence.leave / presence.diff to `sub.members` and `sub.count`. Events may
 * repeat what `joined` or an earlier event told: applying is idempotent (a join counts a user not listed, a
 * leave one listed, or any while the list is partial; a repeated event's `count` is kept while the list is
 * partial), and a diff's `count` is the server's.
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
  // partial: fewer listed than counted (a big room's first page), so a user not listed may be in the room
  const partial = sub.count !== null && sub.count.users > sub.members.size;
  const old = sub.members.get(user);
  if (ev.op === "presence.join") {
    if (!old && sub.count) sub.count.users += 1;
    sub.members.set(user, { connections: 1, ...old, user, ...(ev.name ? { name: ev.name } : {}) });
  } else {
    // A repeated leave (events are checked; one that crossed another is told again) counts once: an
    // unlisted user is counted as gone only while the list is partial.
    if (sub.count && (old || partial)) sub.count.users = Math.max(0, sub.count.users - 1);
    sub.members.delete(user);
  }
  // a repeated event carries the room's count as the server read it (a round trip old): the figure to keep
  // when the list is partial (a whole list counts itself), never below the users listed
  if (partial && ev.count) {
    const users = Math.max(ev.count.users, sub.members.size);
    sub.count = { users, connections: Math.max(ev.count.connections, users) };
  }
}
