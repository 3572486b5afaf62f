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
    /** @type {Map<string, Subscription>} */
    rooms: Map<string, Subscription>;
    /** @type {Map<string, GameRoom>} */
    games: Map<string, GameRoom>;
    /** @param {MessageFrame} frame */
    _onMessage(frame: MessageFrame): void;
    /**
     * Join a chat room. `onMessage` gets every `message` of the room once, in order, including the
     * ones a rejoin recovers. Resolves with the Subscription after the server's `joined`.
     * @param {string} room
     * @param {(msg: MessageFrame) => void} onMessage
     * @param {JoinOptions} [options]
     * @returns {Promise<Subscription>}
     */
    join(room: string, onMessage: (msg: MessageFrame) => void, options?: JoinOptions): Promise<Subscription>;
    /** Wait until `sub` is joined by the rejoin after a reconnect (bounded by ackTimeout).
     * @param {Subscription} sub */
    _awaitRejoin(sub: Subscription): Promise<any>;
    /** @param {Subscription} sub @param {boolean} rejoin */
    _join(sub: Subscription, rejoin: boolean): Promise<void>;
    /**
     * Leave a room (chat or game): no rejoin after a reconnect.
     * @param {string} room
     */
    leave(room: string): Promise<void>;
    /**
     * Publish `data` to a joined room. Resolves with the server's ack `{offset}` (everyone else
     * in the room gets the message); rejects with a WirehubError on an error reply, on timeout, or
     * when the connection dropped before the ack (`disconnected`: it may or may not have been sent).
     * @param {string} room
     * @param {any} data
     * @param {{timeout?: number}} [options]
     * @returns {Promise<{offset: number}>}
     */
    publish(room: string, data: any, options?: {
        timeout?: number;
    }): Promise<{
        offset: number;
    }>;
    /**
     * Who is in a room: one entry per user, in user order; the first page (the server's
     * `presence_limit`) or the one after `after` (see presencePage for the cursor and count).
     * @param {string} room
     * @param {{after?: string, limit?: number}} [options]
     * @returns {Promise<Array<Member>>}
     */
    presence(room: string, options?: {
        after?: string;
        limit?: number;
    }): Promise<Array<Member>>;
    /**
     * A page of a room's members: `{members, count, cursor}`; pass `cursor` back as `after` for the
     * next page (`cursor` is null on the last one). Start from `subscription.cursor` to continue
     * after the list `joined` gave.
     * @param {string} room
     * @param {{after?: string, limit?: number}} [options]
     * @returns {Promise<{members: Array<Member>, count: {users: number, connections: number}, cursor: string | null}>}
     */
    presencePage(room: string, options?: {
        after?: string;
        limit?: number;
    }): Promise<{
        members: Array<Member>;
        count: {
            users: number;
            connections: number;
        };
        cursor: string | null;
    }>;
    /**
     * After a `truncated` diff the members known here may be stale (diffs were cut short, a replica died with some
     * unsent, or the server missed events while its link to the bus was down): the list starts again from the
     * room's first page, and the diffs that came while it was read are applied on top (each names users as they
     * were when it was sent, so the later one wins).
     * @param {Subscription} sub
     */
    _reloadMembers(sub: Subscription): Promise<void>;
    /**
     * How many are in a room, without the list: `{users, connections}`.
     * @param {string} room
     * @returns {Promise<{users: number, connections: number}>}
     */
    presenceCount(room: string): Promise<{
        users: number;
        connections: number;
    }>;
    /**
     * A page of a room's history: the newest `limit` messages, or those after `since`.
     * @param {string} room
     * @param {{limit?: number, since?: {offset: number, epoch: string}}} [options]
     * @returns {Promise<{messages: MessageFrame[], offset: number, epoch: string, complete: boolean}>}
     */
    history(room: string, options?: {
        limit?: number;
        since?: {
            offset: number;
            epoch: string;
        };
    }): Promise<{
        messages: MessageFrame[];
        offset: number;
        epoch: string;
        complete: boolean;
    }>;
    /**
     * Join a game room (on a `/ws/game` connection): resolves with a GameRoom whose `state` and
     * `version` follow the server; `onChange(state, info)` runs after each change.
     * @param {string} room
     * @param {(state: any, info: {version: number, by?: string[], resync: boolean}) => void} [onChange]
     * @returns {Promise<GameRoom>}
     */
    joinGame(room: string, onChange?: (state: any, info: {
        version: number;
        by?: string[];
        resync: boolean;
    }) => void): Promise<GameRoom>;
    /** @param {GameRoom} game */
    _joinGame(game: GameRoom): Promise<void>;
}
export default WirehubClient;
export type ClientOptions = import("./types.js").ClientOptions;
export type MessageFrame = import("./types.js").MessageFrame;
export type JoinInfo = import("./types.js").JoinInfo;
export type JoinOptions = import("./types.js").JoinOptions;
export type Member = import("./types.js").Member;
import { Connection } from "./connection.js";
import { Subscription } from "./rooms.js";
import { GameRoom } from "./rooms.js";
