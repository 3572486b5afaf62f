// wirehub-client (served as /static/wirehub.js): the wirehub client for browsers and Node 20+. An ES module with no dependencies.
//
//   import { WirehubClient } from "/static/wirehub.js";       // or from "wirehub-client" (npm)
//   const client = new WirehubClient("/ws/chat", { token: async () => fetchMyToken() });
//   await client.connect();
//   const lobby = await client.join("lobby", (msg) => console.log(msg.from, msg.data));
//   await client.publish("lobby", { text: "hi" });          // resolves with the ack {offset}
//
// What it does on top of the plain WebSocket protocol (docs/protocol.md, docs/clients.md):
// reconnects after a drop with exponential backoff and full jitter, honours the server's close
// codes and retry hints, rejoins every room with its last {offset, epoch} and reports per room
// whether the server `recovered` the messages missed meanwhile, refreshes the token before it
// expires, correlates replies (acks) with a timeout, and keeps game-room state in sync by
// applying JSON Patches (RFC 6902), resyncing on a version gap.
//
// The modules: policy.js (close codes, errors, backoff), patch.js (JSON Patch), connection.js (the
// socket, requests, reconnects), rooms.js (Subscription, GameRoom, presence), client.js (WirehubClient).

export { CloseCode, WirehubError, backoffDelay, closePolicy, parseRetryMs } from "./policy.js";
export { applyPatch } from "./patch.js";
export { GameRoom, Subscription, applyPresenceEvent, takePresenceSnapshot } from "./rooms.js";
export { WirehubClient } from "./client.js";
export { WirehubClient as default } from "./client.js";
export * from "./types.js";
