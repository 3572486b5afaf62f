// Shared helpers of the package's tests. tests/test_js_client.py starts the servers, runs `npm test` here and sets:
// WIREHUB_URL (anonymous auth), WIREHUB_JWT_URL + WIREHUB_JWT_SECRET (JWT auth) and WIREHUB_CONTROL.
import { createHmac, randomBytes } from "node:crypto";
import { WirehubClient } from "wirehub-client";

export const BASE = process.env.WIREHUB_URL;
export const JWT_BASE = process.env.WIREHUB_JWT_URL;
const SECRET = process.env.WIREHUB_JWT_SECRET || "";
const CONTROL = process.env.WIREHUB_CONTROL;
if (!BASE || !CONTROL) throw new Error("run these through tests/test_js_client.py (WIREHUB_URL is not set)");

export const FAST = { backoffMin: 50, backoffMax: 200, ackTimeout: 5000, pingInterval: 0 };

/** @type {WirehubClient[]} */
const made = [];

/** A client with short backoffs, closed by closeAll(). */
export function client(path = "/ws/chat", options = {}, base = BASE) {
  const c = new WirehubClient(base + path, { ...FAST, ...options });
  made.push(c);
  return c;
}

export function closeAll() {
  for (const c of made.splice(0)) c.close();
}

export const uniqueRoom = (prefix = "js") => `${prefix}-${randomBytes(5).toString("hex")}`;

/** Ask the test harness to make the server act: close a user's sessions, or restart. */
export async function control(action, body = {}) {
  const res = await fetch(`${CONTROL}/${action}`, { method: "POST", body: JSON.stringify(body) });
  if (!res.ok) throw new Error(`control ${action}: ${res.status}`);
  return res.json();
}

/** An HS256 JWT signed with the JWT server's secret. */
export function mint({ sub = "ann", rooms = ["*"], ttl = 600 } = {}) {
  const b64 = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub, rooms, exp: Math.floor(Date.now() / 1000) + ttl })}`;
  return `${body}.${createHmac("sha256", SECRET).update(body).digest("base64url")}`;
}

/** Wait until cond() is true (polling), or fail after `timeout` ms. */
export async function eventually(cond, timeout = 5000, what = "condition") {
  const deadline = Date.now() + timeout;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`${what} not met within ${timeout} ms`);
    await sleep(20);
  }
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
