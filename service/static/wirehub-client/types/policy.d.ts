/**
 * Exponential backoff with full jitter: a uniform random delay in [0, min(max, base * 2^attempt)).
 * @param {number} attempt 0 for the first retry
 * @param {number} base
 * @param {number} max
 * @param {() => number} [random]
 */
export function backoffDelay(attempt: number, base: number, max: number, random?: () => number): number;
/**
 * The reconnect hint of a close reason ("server going away; retry_ms=1234" -> 1234), or null.
 * @param {string | undefined} reason
 */
export function parseRetryMs(reason: string | undefined): number | null;
/**
 * What the client does after the server closed with `code`.
 * @param {number} code
 * @param {string} reason
 * @param {number} attempt consecutive failed attempts so far
 * @param {{backoffMin: number, backoffMax: number, random?: () => number}} o
 * @returns {{reconnect: boolean, delay: number, newToken: boolean}}
 */
export function closePolicy(code: number, reason: string, attempt: number, o: {
    backoffMin: number;
    backoffMax: number;
    random?: () => number;
}): {
    reconnect: boolean;
    delay: number;
    newToken: boolean;
};
/** Close codes of docs/protocol.md. */
export const CloseCode: Readonly<{
    NORMAL: 1000;
    GOING_AWAY: 1001;
    POLICY: 1008;
    TOO_BIG: 1009;
    INTERNAL: 1011;
    TOKEN_EXPIRED: 4001;
    FORBIDDEN: 4003;
    SLOW_CONSUMER: 4008;
    RATE_LIMITED: 4029;
}>;
/** The WebSocket subprotocol of docs/protocol.md. */
export const SUBPROTOCOL: "wirehub.v1";
/** A failed request: `code` is a server error code (`forbidden`, `not_joined`, ...) or one of
 * the client's own: `timeout`, `disconnected`, `closed`, `stopped`. */
export class WirehubError extends Error {
    /**
     * @param {string} code
     * @param {string} message
     * @param {any} [frame] the server's error frame
     */
    constructor(code: string, message: string, frame?: any);
    code: string;
    frame: any;
}
