/**
 * A token, or a callback that fetches a fresh one (called again for a reconnect after 4001,
 * after a failed handshake, and before the token expires).
 */
export type TokenSource = string | (() => (string | null | undefined | Promise<string | null | undefined>));
export type ClientOptions = {
    /**
     * no token = anonymous
     */
    token?: TokenSource | undefined;
    /**
     * how the token travels on the upgrade:
     * `Sec-WebSocket-Protocol: wirehub.v1, bearer.<token>` (default; kept out of URLs and logs) or
     * the `token` query parameter
     */
    tokenTransport?: "subprotocol" | "query" | undefined;
    /**
     * a WebSocket constructor (default: globalThis.WebSocket)
     */
    WebSocket?: any;
    /**
     * first reconnect delay ceiling in ms (default 500)
     */
    backoffMin?: number | undefined;
    /**
     * largest reconnect delay ceiling in ms (default 30000)
     */
    backoffMax?: number | undefined;
    /**
     * ms a request waits for its reply (default 10000)
     */
    ackTimeout?: number | undefined;
    /**
     * ms a connection attempt may take (default 10000)
     */
    connectTimeout?: number | undefined;
    /**
     * refresh the token this many ms before it expires (default 30000)
     */
    refreshMargin?: number | undefined;
    /**
     * ms between application pings that detect dead connections (default 25000; 0 = off)
     */
    pingInterval?: number | undefined;
    /**
     * reconnect after a drop (default true)
     */
    reconnect?: boolean | undefined;
    /**
     * (re)join the rooms known at connect time in the upgrade URL, one round trip
     * less (default true; turned off by itself for a server that ignores them)
     */
    urlJoins?: boolean | undefined;
    /**
     * a logger for the client's decisions
     */
    debug?: ((msg: string, data?: any) => void) | undefined;
};
/**
 * one user in a room's presence
 */
export type Member = {
    user: string;
    /**
     * the display name
     */
    name?: string | undefined;
    /**
     * how many of the user's connections are in the room
     */
    connections: number;
};
export type MessageFrame = {
    op: "message";
    room: string;
    /**
     * user id of the sender ("server" for the HTTP publish API)
     */
    from: string;
    data: any;
    /**
     * history offset within the room's epoch
     */
    offset: number;
    /**
     * publish time, UNIX seconds
     */
    ts: number;
};
export type JoinInfo = {
    room: string;
    /**
     * the newest offset in the room's history
     */
    offset: number;
    epoch: string;
    /**
     * true when every message missed since the last position follows
     */
    recovered: boolean;
    /**
     * true when this is an automatic rejoin after a reconnect
     */
    rejoin: boolean;
    presence: Array<Member>;
};
export type JoinOptions = {
    /**
     * resume from a stored position
     */
    since?: {
        offset: number;
        epoch: string;
    } | undefined;
    /**
     * after the first join and after every rejoin
     */
    onJoined?: ((info: JoinInfo) => void) | undefined;
    /**
     * presence.join / presence.leave / presence.diff, after
     * the subscription's `members` and `count` were updated
     */
    onPresence?: ((event: PresenceEvent) => void) | undefined;
    /**
     * the server lost messages of this room; {epoch, offset} is the position the next messages continue
     */
    onGap?: ((event: {
        room: string;
        epoch?: string;
        offset?: number;
    }) => void) | undefined;
    /**
     * the server left the room for this client
     * (after a `refresh`, the new token no longer allows it); it is not rejoined
     */
    onLeft?: ((event: {
        room: string;
        reason?: string;
    }) => void) | undefined;
};
export type PresenceEvent = {
    op: "presence.join" | "presence.leave" | "presence.diff";
    room: string;
    /**
     * presence.join / presence.leave
     */
    user?: string | undefined;
    name?: string | undefined;
    /**
     * presence.diff
     */
    joins?: {
        user: string;
        name?: string;
    }[] | undefined;
    /**
     * presence.diff
     */
    leaves?: string[] | undefined;
    /**
     * presence.diff, and a repeated presence.join /
     * presence.leave: the room's totals
     */
    count?: {
        users: number;
        connections: number;
    } | undefined;
    /**
     * presence.diff: the members known may be stale (the client reloads them)
     */
    truncated?: boolean | undefined;
};
