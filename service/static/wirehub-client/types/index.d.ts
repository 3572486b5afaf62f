export { applyPatch } from "./patch.js";
export * from "./types.js";
export { CloseCode, WirehubError, backoffDelay, closePolicy, parseRetryMs } from "./policy.js";
export { GameRoom, Subscription, applyPresenceEvent, takePresenceSnapshot } from "./rooms.js";
export { WirehubClient, WirehubClient as default } from "./client.js";
