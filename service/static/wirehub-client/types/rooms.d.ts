/**
 * The presence part of a `joined` reply: the first members, the count and the cursor.
 * @param {Subscription} sub
 * @param {Record<string, any>} joined
 */
export function takePresenceSnapshot(sub: Subscription, joined: Record<string, any>): void;
/**
 * Apply presence.join / presence.leave / presence.diff to `sub.members` and `sub.count`. Events may
 * repeat what `joined` or an earlier event told: applying is idempotent (a join counts a user not listed, a
 * leave one listed, or any while the list is partial; a repeated event's `count` is kept while the list is
 * partial), and a diff's `count` is the server's.
 * @param {Subscription} sub
 * @param {PresenceEvent} ev
 */
export function applyPresenceEvent(sub: Subscription, ev: PresenceEvent): void;
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
    constructor(client: WirehubClient, room: string, onMessage: (msg: MessageFrame) => void, options: JoinOptions);
    client: import("./client.js").WirehubClient;
    room: string;
    onMessage: (msg: MessageFrame) => void;
    options: import("./types.js").JoinOptions;
    /** @type {number | null} offset of the last message received */
    offset: number | null;
    /** @type {string | null} */
    epoch: string | null;
    /** @type {boolean | null} whether the last (re)join recovered every missed message */
    recovered: boolean | null;
    /** @type {JoinInfo["presence"]} */
    presence: JoinInfo["presence"];
    /** @type {{users: number, connections: number} | null} the room's totals (null: unknown, or presence off) */
    count: {
        users: number;
        connections: number;
    } | null;
    /** @type {string | null} where `presencePage` goes on from joined's list (null: it listed everyone) */
    cursor: string | null;
    /** @type {Map<string, Member>} members known here, by user */
    members: Map<string, Member>;
    /** @type {PresenceEvent[] | null} while the list is reloaded (after a `truncated` diff): the diffs that came */
    _reloading: PresenceEvent[] | null;
    /** offsets of this client's own publishes, not given to onMessage when history replays them */
    /** @type {Set<number>} */
    own: Set<number>;
    /** The position to store for a later `join(room, fn, {since})`, or null. */
    get position(): {
        offset: number;
        epoch: string;
    } | null;
    /**
     * Take a position the server named: within an epoch it only moves forward (a message already
     * given to onMessage is never asked for again); another epoch starts over.
     * @param {any} offset @param {any} epoch
     */
    _move(offset: any, epoch: any): void;
    /** Publish to this room (see WirehubClient.publish). @param {any} data */
    publish(data: any, options?: {}): Promise<{
        offset: number;
    }>;
    leave(): Promise<void>;
}
/** A joined game room: `state` follows the server's document, patch by patch. */
export class GameRoom {
    /**
     * @param {WirehubClient} client
     * @param {string} room
     * @param {(state: any, info: {version: number, by?: string[], resync: boolean}) => void} [onChange]
     */
    constructor(client: WirehubClient, room: string, onChange?: (state: any, info: {
        version: number;
        by?: string[];
        resync: boolean;
    }) => void);
    client: import("./client.js").WirehubClient;
    room: string;
    onChange: ((state: any, info: {
        version: number;
        by?: string[];
        resync: boolean;
    }) => void) | undefined;
    /** @type {any} */
    state: any;
    version: number;
    /** how many times the state was reloaded after a gap */
    resyncs: number;
    /** @type {Promise<void> | null} */
    _syncing: Promise<void> | null;
    /**
     * Send a JSON Patch; resolves with {version} once the server committed it (the `patch` event
     * that applies it to `state` arrives separately, to every member, this client included).
     * @param {Array<{op: string, path: string, value?: any, from?: string}>} patch
     * @param {{timeout?: number}} [options]
     * @returns {Promise<{version: number}>}
     */
    update(patch: Array<{
        op: string;
        path: string;
        value?: any;
        from?: string;
    }>, options?: {
        timeout?: number;
    }): Promise<{
        version: number;
    }>;
    /** Reload the whole state from the server. */
    sync(): Promise<void>;
    leave(): Promise<void>;
    /** @param {any} frame @param {boolean} resync */
    _state(frame: any, resync: boolean): void;
    /** @param {any} frame */
    _patch(frame: any): void;
}
export type WirehubClient = import("./client.js").WirehubClient;
export type MessageFrame = import("./types.js").MessageFrame;
export type JoinInfo = import("./types.js").JoinInfo;
export type JoinOptions = import("./types.js").JoinOptions;
export type PresenceEvent = import("./types.js").PresenceEvent;
export type Member = import("./types.js").Member;
