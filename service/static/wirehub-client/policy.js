// Close codes, errors and the reconnect policy: pure functions, no I/O.

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

/** The WebSocket subprotocol of docs/protocol.md. */
export const SUBPROTOCOL = "wirehub.v1";

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
