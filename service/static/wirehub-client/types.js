// The JSDoc types shared by the client's modules (index.d.ts re-exports them).

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
 * @property {boolean} [urlJoins] (re)join the rooms known at connect time in the upgrade URL, one round trip
 *   less (default true; turned off by itself for a server that ignores them)
 * @property {(msg: string, data?: any) => void} [debug] a logger for the client's decisions
 */

/**
 * @typedef {object} Member one user in a room's presence
 * @property {string} user
 * @property {string} [name] the display name
 * @property {number} connections how many of the user's connections are in the room
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
 * @property {Array<Member>} presence
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
 * @property {{users: number, connections: number}} [count] presence.diff, and a repeated presence.join /
 *   presence.leave: the room's totals
 * @property {boolean} [truncated] presence.diff: the members known may be stale (the client reloads them)
 */

export {};
