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
    constructor(url: string, options?: ClientOptions);
    url: string;
    options: {
        /**
         * no token = anonymous
         */
        token?: import("./types.js").TokenSource | undefined;
        /**
         * how the token travels on the upgrade:
         * `Sec-WebSocket-Protocol: wirehub.v1, bearer.<token>` (default; kept out of URLs and logs) or
         * the `token` query parameter
         */
        tokenTransport: string;
        /**
         * a WebSocket constructor (default: globalThis.WebSocket)
         */
        WebSocket?: any;
        /**
         * first reconnect delay ceiling in ms (default 500)
         */
        backoffMin: number;
        /**
         * largest reconnect delay ceiling in ms (default 30000)
         */
        backoffMax: number;
        /**
         * ms a request waits for its reply (default 10000)
         */
        ackTimeout: number;
        /**
         * ms a connection attempt may take (default 10000)
         */
        connectTimeout: number;
        /**
         * refresh the token this many ms before it expires (default 30000)
         */
        refreshMargin: number;
        /**
         * ms between application pings that detect dead connections (default 25000; 0 = off)
         */
        pingInterval: number;
        /**
         * reconnect after a drop (default true)
         */
        reconnect: boolean;
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
    WebSocket: any;
    /** @type {Status} */
    status: Status;
    /** @type {any} the last welcome frame */
    welcome: any;
    /** connections opened so far (1 + reconnects) */
    connections: number;
    /** @type {{code: number, reason: string} | null} */
    lastClose: {
        code: number;
        reason: string;
    } | null;
    _ws: any;
    _ready: boolean;
    _attempt: number;
    _nextId: number;
    /** @type {Map<string, Pending>} */
    _pending: Map<string, Pending>;
    /** @type {Array<string>} ids of requests waiting for the connection */
    _queue: Array<string>;
    /** @type {Map<string, Set<Function>>} */
    _handlers: Map<string, Set<Function>>;
    _token: string | null;
    _tokenStale: boolean;
    _timers: {
        reconnect: any;
        refresh: any;
        ping: any;
        connect: any;
    };
    /** @type {{resolve: () => void, reject: (e: any) => void, promise: Promise<void>} | null} */
    _opened: {
        resolve: () => void;
        reject: (e: any) => void;
        promise: Promise<void>;
    } | null;
    _stopped: boolean;
    _opening: boolean;
    _urlJoins: boolean;
    _skipUrlJoins: boolean;
    /** @type {Map<string, {id: string, reply: Promise<any>}>} the current attempt's URL joins, by room */
    _urlJoined: Map<string, {
        id: string;
        reply: Promise<any>;
    }>;
    /**
     * @param {string} name
     * @param {(arg: any) => void} fn
     * @returns {() => void} unsubscribe
     */
    on(name: string, fn: (arg: any) => void): () => void;
    /** @param {string} name @param {any} arg */
    _emit(name: string, arg: any): void;
    /** @param {string} msg @param {any} [data] */
    _debug(msg: string, data?: any): void;
    /** @param {Status} status */
    _setStatus(status: Status): void;
    /**
     * Connect (and keep reconnecting). Resolves once the first connection is open and its rooms
     * are joined; rejects only when the server refuses for good (4003) or close() is called.
     * @returns {Promise<void>}
     */
    connect(): Promise<void>;
    /** Close for good: no reconnect; pending requests fail with `closed`. */
    close(): void;
    _clearTimers(): void;
    _token_(): Promise<string | null>;
    _open(): Promise<void>;
    _openSocket(): Promise<void>;
    /** @param {any} ws @param {number} code @param {string} reason @param {boolean} welcomed */
    _onClose(ws: any, code: number, reason: string, welcomed: boolean): void;
    /** @param {number} delay */
    _scheduleReconnect(delay: number): void;
    /** @param {any} frame */
    _onFrame(frame: any): void;
    /**
     * A frame that is neither a reply nor a welcome nor an error: WirehubClient handles them.
     * @param {any} _frame
     */
    _dispatch(_frame: any): void;
    /** Rejoin what was joined, after a (re)connect and before anything queued goes out. */
    _rejoin(): Promise<void>;
    /**
     * The joins to put in the next upgrade URL (WirehubClient's rooms), each registered with _expectReply.
     * @returns {Array<Record<string, any>>}
     */
    _urlJoinItems(): Array<Record<string, any>>;
    /**
     * Rooms left after this connection's URL was made: their URL joins went through on the server, so leave
     * them (else the server keeps this connection a member that the client no longer reads).
     */
    _leaveUrlJoinsLeft(): void;
    /**
     * A reply to a request this side did not send (a join of the upgrade URL), awaited like one.
     * @param {string} room @param {string} id @param {(reply: any) => void} [onReply]
     */
    _expectReply(room: string, id: string, onReply?: (reply: any) => void): void;
    /**
     * The reply to the URL join of `room` on this connection, or undefined when the URL did not carry it.
     * @param {string} room
     * @returns {Promise<any> | undefined}
     */
    _takeUrlJoin(room: string): Promise<any> | undefined;
    /** @param {any} frame */
    _onWelcome(frame: any): Promise<void>;
    /** @param {number | undefined} expiresAt UNIX seconds */
    _scheduleRefresh(expiresAt: number | undefined): void;
    /** @param {any} ws */
    _refresh(ws: any): Promise<void>;
    /**
     * Send `{op, ...}` with a fresh id and resolve with the reply carrying it (reject with a
     * WirehubError on an `error` reply or after `timeout` ms). While disconnected the request waits
     * for the next connection (its timeout runs meanwhile).
     * @param {Record<string, any>} body
     * @param {number} [timeout]
     * @param {(reply: any) => void} [onReply] internal: runs as the reply is read, before later frames
     * @returns {Promise<any>}
     */
    request(body: Record<string, any>, timeout?: number, onReply?: (reply: any) => void): Promise<any>;
    /** @param {string} id */
    _send(id: string): void;
    /** @param {string} code @param {string} message @param {boolean} queuedToo */
    _failAll(code: string, message: string, queuedToo: boolean): void;
}
export type ClientOptions = import("./types.js").ClientOptions;
export type Status = "idle" | "connecting" | "open" | "reconnecting" | "closed" | "stopped";
/**
 * a request waiting for its reply
 */
export type Pending = {
    resolve: (v: any) => void;
    reject: (e: any) => void;
    timer: any;
    sent: boolean;
    frame: any;
    onReply: ((reply: any) => void) | undefined;
};
