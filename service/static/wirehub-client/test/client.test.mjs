// The JS client against real wirehub servers (started by tests/test_js_client.py).
import { test, afterEach } from "node:test";
import assert from "node:assert/strict";
import { WirehubError } from "wirehub-client";
import { JWT_BASE, client, closeAll, control, eventually, mint, sleep, uniqueRoom } from "./helpers.mjs";

afterEach(() => closeAll());

test("join, publish with ack, presence, history", async () => {
  const room = uniqueRoom();
  const a = client(), b = client();
  const gotA = [], gotB = [];
  await a.connect();
  const subA = await a.join(room, (m) => gotA.push(m));
  await b.join(room, (m) => gotB.push(m)); // connects by itself
  assert.equal(subA.recovered, false);
  assert.ok(subA.epoch);
  const { offset } = await a.publish(room, { text: "hi" });
  assert.ok(offset >= 1);
  await eventually(() => gotB.length === 1);
  assert.deepEqual(gotB[0].data, { text: "hi" });
  assert.equal(gotB[0].offset, offset);
  assert.equal(gotB[0].from, a.welcome.user);
  assert.deepEqual(gotA, [], "no echo of one's own message");
  const members = await a.presence(room);
  assert.deepEqual(members.map((m) => m.user).sort(), [a.welcome.user, b.welcome.user].sort());
  const page = await b.history(room, { limit: 10 });
  assert.deepEqual(page.messages.map((m) => m.data), [{ text: "hi" }]);
  assert.equal(page.complete, true);
  assert.equal(page.epoch, subA.epoch);
});

test("error replies and timeouts reject with a WirehubError", async () => {
  const c = client();
  await c.connect();
  await assert.rejects(c.publish(uniqueRoom(), "x"), (err) => err instanceof WirehubError && err.code === "not_joined");
  await assert.rejects(c.request({ op: "nope" }), (err) => err.code === "unknown_op");
  // nothing listens there: the publish waits for a connection that never comes, then times out
  const nowhere = client("/ws/chat", {}, "http://127.0.0.1:9");
  await assert.rejects(nowhere.publish(uniqueRoom(), "x", { timeout: 300 }), (err) => err.code === "timeout");
  assert.equal(nowhere.connections, 0);
  const room = uniqueRoom();
  await c.join(room, () => {});
  await assert.rejects(c.join(room, () => {}), (err) => err.code === "bad_request");
  await assert.doesNotReject(c.publish(room, "still fine"));
});

test("1001 with a hint: reconnects after it, rejoins, recovers the missed messages exactly once", async () => {
  const room = uniqueRoom();
  const listener = client(), other = client();
  const got = [], joins = [], closes = [];
  listener.on("close", (c) => closes.push(c));
  await listener.join(room, (m) => got.push(m.data), { onJoined: (info) => joins.push(info) });
  await other.join(room, () => {});
  const own = await listener.publish(room, "mine");
  await other.publish(room, "before");
  await eventually(() => got.length === 1);

  const started = Date.now();
  await control("close", { user: listener.welcome.user, code: 1001, retry_ms: 300 });
  await eventually(() => listener.status === "reconnecting");
  await other.publish(room, "while away 1");
  await other.publish(room, "while away 2");
  await eventually(() => joins.length === 2, 5000, "the rejoin");
  assert.ok(Date.now() - started >= 290, "the retry hint was honoured");
  assert.equal(closes[0].code, 1001);
  assert.equal(closes[0].delay, 300);
  assert.equal(joins[1].rejoin, true);
  assert.equal(joins[1].recovered, true);
  await other.publish(room, "after");
  await eventually(() => got.length === 4);
  await sleep(100);
  assert.deepEqual(got, ["before", "while away 1", "while away 2", "after"]);
  assert.equal(listener.connections, 2);
  const back = await listener.publish(room, "back");
  assert.ok(back.offset > own.offset);
});

test("a join that a dropped connection interrupts completes after the reconnect", async () => {
  const c = client();
  await c.connect();
  const room = uniqueRoom();
  const joining = c.join(room, () => {}); // the join frame is on the wire when this returns
  c._ws.close(4000, "test: drop"); // its reply is never read
  const sub = await joining;
  assert.equal(sub.room, room);
  assert.equal(c.connections, 2);
  assert.ok((await c.publish(room, "x")).offset >= 1);
});

test("a server that stops answering: the ping times out and the client reconnects", async () => {
  const room = uniqueRoom();
  const c = client("/ws/chat", { pingInterval: 300, ackTimeout: 250 });
  const closes = [], joins = [];
  c.on("close", (x) => closes.push(x));
  await c.join(room, () => {}, { onJoined: (info) => joins.push(info) });
  const frozen = control("freeze", { seconds: 1.2 }); // answers once the server runs again
  await eventually(() => closes.length === 1, 3000, "the ping timeout");
  assert.equal(closes[0].reason, "ping timeout");
  await frozen;
  await eventually(() => c.connections === 2 && c.status === "open", 8000, "the reconnect");
  assert.equal(joins[1].recovered, true);
  assert.ok((await c.publish(room, "alive")).offset >= 1);
});

test("publishes made while disconnected wait for the reconnect", async () => {
  const room = uniqueRoom();
  const c = client(), other = client();
  const seen = [];
  await c.join(room, () => {});
  await other.join(room, (m) => seen.push(m.data));
  await control("close", { user: c.welcome.user, code: 4008, retry_ms: 200 });
  await eventually(() => c.status === "reconnecting");
  const { offset } = await c.publish(room, "queued");
  assert.ok(offset >= 1);
  await eventually(() => seen.length === 1);
  assert.deepEqual(seen, ["queued"]);
});

test("4029 reconnects only after the hint and a longer backoff", async () => {
  const c = client();
  const closes = [];
  c.on("close", (x) => closes.push(x));
  await c.join(uniqueRoom(), () => {});
  const started = Date.now();
  await control("close", { user: c.welcome.user, code: 4029, retry_ms: 250 });
  await eventually(() => c.connections === 2 && c.status === "open");
  assert.ok(Date.now() - started >= 240);
  assert.ok(closes[0].delay >= 250);
});

test("4003 stops for good", async () => {
  const c = client();
  const statuses = [];
  c.on("status", (s) => statuses.push(s));
  await c.join(uniqueRoom(), () => {});
  await control("close", { user: c.welcome.user, code: 4003 });
  await eventually(() => c.status === "stopped");
  await sleep(300);
  assert.equal(c.connections, 1);
  await assert.rejects(c.publish("x", 1), (err) => err.code === "stopped");
  await assert.rejects(c.connect(), (err) => err.code === "stopped");
});

test("4001: a new token from the callback, then the connection comes back", async () => {
  let calls = 0;
  const c = client("/ws/chat", { token: async () => { calls += 1; return mint({ sub: "ann" }); } }, JWT_BASE);
  const room = uniqueRoom();
  await c.join(room, () => {});
  assert.equal(c.welcome.user, "ann");
  assert.equal(calls, 1);
  await control("close", { server: "jwt", user: "ann", code: 4001 });
  await eventually(() => c.connections === 2 && c.status === "open");
  assert.equal(calls, 2, "fetched a new token before reconnecting");
  assert.ok((await c.publish(room, "ok")).offset >= 1);
});

test("a refused upgrade (401) fetches a new token", async () => {
  const tokens = ["garbage", mint({ sub: "bob" })];
  const c = client("/ws/chat", { token: () => tokens.shift() }, JWT_BASE);
  await c.connect();
  assert.equal(c.welcome.user, "bob");
  assert.equal(c.connections, 1);
});

test("the token is refreshed before it expires, on the same connection", async () => {
  let calls = 0;
  const c = client("/ws/chat", {
    token: () => { calls += 1; return mint({ sub: "cy", ttl: calls === 1 ? 3 : 600 }); },
    refreshMargin: 1500,
  }, JWT_BASE);
  const refreshed = [];
  c.on("refreshed", (r) => refreshed.push(r));
  const room = uniqueRoom();
  await c.join(room, () => {});
  await eventually(() => refreshed.length === 1, 4000, "a refresh");
  assert.equal(calls, 2);
  assert.ok(refreshed[0].expires_at > Date.now() / 1000 + 500);
  await sleep(2000); // past the first token's expiry
  assert.equal(c.connections, 1);
  assert.equal(c.status, "open");
  assert.ok((await c.publish(room, "still here")).offset >= 1);
});

test("a refresh whose token drops a room: the server leaves it, and it is not rejoined", async () => {
  let calls = 0;
  const c = client("/ws/chat", {
    token: () => { calls += 1; return calls === 1 ? mint({ sub: "eve", rooms: ["*"], ttl: 3 }) : mint({ sub: "eve", rooms: ["keep-*"] }); },
    refreshMargin: 1500,
  }, JWT_BASE);
  const keep = uniqueRoom("keep"), drop = uniqueRoom("drop");
  const left = [];
  await c.join(keep, () => {});
  await c.join(drop, () => {}, { onLeft: (ev) => left.push(ev) });
  await eventually(() => left.length === 1, 4000, "the left event");
  assert.equal(left[0].room, drop);
  assert.deepEqual([...c.rooms.keys()], [keep]);
  await control("close", { server: "jwt", user: "eve", code: 1001, retry_ms: 50 });
  await eventually(() => c.connections === 2 && c.status === "open");
  assert.deepEqual([...c.rooms.keys()], [keep]);
  await assert.rejects(c.publish(drop, "x"), (err) => err.code === "not_joined");
});

test("the token can travel as a query parameter too", async () => {
  const c = client("/ws/chat", { token: mint({ sub: "dee" }), tokenTransport: "query" }, JWT_BASE);
  await c.connect();
  assert.equal(c.welcome.user, "dee");
});

test("game rooms: state follows the patches in every client and converges", async () => {
  const room = uniqueRoom("game");
  const a = client("/ws/game"), b = client("/ws/game");
  const ga = await a.joinGame(room);
  const gb = await b.joinGame(room);
  assert.deepEqual(ga.state, {});
  const acks = await Promise.all([
    ...Array.from({ length: 5 }, (_, i) => ga.update([{ op: "add", path: `/a${i}`, value: i }])),
    ...Array.from({ length: 5 }, (_, i) => gb.update([{ op: "add", path: `/b${i}`, value: i }])),
  ]);
  const top = Math.max(...acks.map((x) => x.version)); // concurrent updates may share a commit
  assert.ok(top >= 1 && top <= 10);
  await eventually(() => ga.version === top && gb.version === top, 5000, "both at the last version");
  assert.deepEqual(ga.state, gb.state);
  assert.equal(Object.keys(ga.state).length, 10);
  await assert.rejects(ga.update([{ op: "remove", path: "/missing" }]), (err) => err instanceof WirehubError);
});

test("game rooms: a version gap triggers a resync", async () => {
  const room = uniqueRoom("game");
  const a = client("/ws/game"), b = client("/ws/game");
  const ga = await a.joinGame(room);
  const gb = await b.joinGame(room);
  await gb.update([{ op: "add", path: "/x", value: 1 }]);
  await eventually(() => ga.version === 1);
  // a patch that does not continue version 1 (as if some were lost on the way): resync
  a._onFrame({ op: "patch", room, from_version: 5, version: 5, patch: [{ op: "add", path: "/bogus", value: 1 }], by: ["z"] });
  await eventually(() => ga.resyncs === 1 && ga._syncing === null);
  assert.deepEqual(ga.state, { x: 1 });
  assert.equal(ga.version, 1);
  await gb.update([{ op: "add", path: "/y", value: 2 }]);
  await eventually(() => ga.version === 2);
  assert.deepEqual(ga.state, { x: 1, y: 2 });
});

test("game rooms are rejoined with a fresh state after a reconnect", async () => {
  const room = uniqueRoom("game");
  const a = client("/ws/game"), b = client("/ws/game");
  const ga = await a.joinGame(room);
  const gb = await b.joinGame(room);
  await control("close", { user: a.welcome.user, code: 1001, retry_ms: 200 });
  await eventually(() => a.status === "reconnecting");
  await gb.update([{ op: "add", path: "/while_away", value: true }]);
  await eventually(() => a.connections === 2 && ga.version === 1, 5000, "rejoined with the new state");
  assert.deepEqual(ga.state, { while_away: true });
});

test("a server restart: the client comes back by itself and reports recovered false", async () => {
  const room = uniqueRoom();
  const c = client(), sender = client();
  const got = [], joins = [];
  await c.join(room, (m) => got.push(m.data), { onJoined: (i) => joins.push(i) });
  await sender.join(room, () => {});
  await sender.publish(room, "one");
  await eventually(() => got.length === 1);
  await control("restart", { server: "anon" });
  await eventually(() => joins.length === 2 && sender.status === "open", 8000, "both back");
  assert.equal(joins[1].recovered, false, "a fresh memory history: nothing to recover");
  assert.notEqual(joins[1].epoch, joins[0].epoch);
  await sender.publish(room, "two");
  await eventually(() => got.length === 2);
  assert.deepEqual(got, ["one", "two"]);
});

/** A WebSocket class that records the URLs it opens and the join frames it sends. */
function recordingSocket(onOpen = (url) => {}) {
  const urls = [], joinFrames = [];
  class Recording extends globalThis.WebSocket {
    constructor(url, protocols) {
      super(url, protocols);
      urls.push(url);
      onOpen(url);
    }
    send(data) {
      const frame = JSON.parse(data);
      if (frame.op === "join") joinFrames.push(frame.room);
      super.send(data);
    }
  }
  return { Recording, urls, joinFrames };
}

const joinsOf = (url) => new URL(url).searchParams.getAll("join").map((j) => JSON.parse(j));

test("rooms are joined, and rejoined with since, in the upgrade URL; rooms added while connected with frames", async () => {
  const room = uniqueRoom(), late = uniqueRoom();
  const rec = recordingSocket();
  const listener = client("/ws/chat", { WebSocket: rec.Recording }), other = client();
  const got = [], joins = [];
  const sub = await listener.join(room, (m) => got.push(m.data), { onJoined: (info) => joins.push(info) });
  assert.deepEqual(joinsOf(rec.urls[0]).map((j) => j.room), [room]);
  assert.equal(listener.welcome.joins, 1);
  await listener.join(late, () => {});
  await other.join(room, () => {});
  assert.deepEqual(rec.joinFrames, [late]);
  await other.publish(room, "before");
  await eventually(() => got.length === 1);
  await control("close", { user: listener.welcome.user, code: 1001, retry_ms: 50 });
  await eventually(() => listener.status === "reconnecting");
  await other.publish(room, "while away");
  await eventually(() => joins.length === 2 && listener.status === "open", 5000, "the rejoin");
  const again = joinsOf(rec.urls[1]);
  assert.deepEqual(again.map((j) => j.room), [room, late]);
  assert.deepEqual(again[0].since, { offset: 1, epoch: sub.epoch });
  assert.deepEqual(rec.joinFrames, [late], "no join frame after the reconnect");
  assert.equal(joins[1].recovered, true);
  await other.publish(room, "after");
  await eventually(() => got.length === 3);
  assert.deepEqual(got, ["before", "while away", "after"]);
});

test("urlJoins: false joins with frames only", async () => {
  const room = uniqueRoom();
  const rec = recordingSocket();
  const c = client("/ws/chat", { WebSocket: rec.Recording, urlJoins: false });
  await c.join(room, () => {});
  assert.deepEqual(joinsOf(rec.urls[0]), []);
  assert.deepEqual(rec.joinFrames, [room]);
});

test("a room left while reconnecting, after its join went into the URL, is left on the server", async () => {
  const keep = uniqueRoom(), drop = uniqueRoom();
  let listener = null;
  const rec = recordingSocket(() => {
    if (rec.urls.length === 2) listener.leave(drop); // the reconnect's URL carries the room's join
  });
  listener = client("/ws/chat", { WebSocket: rec.Recording });
  const other = client();
  await listener.join(keep, () => {});
  await listener.join(drop, () => {});
  await other.join(drop, () => {});
  await control("close", { user: listener.welcome.user, code: 1001, retry_ms: 50 });
  await eventually(() => listener.connections === 2 && listener.status === "open", 5000, "the reconnect");
  assert.deepEqual(joinsOf(rec.urls[1]).map((j) => j.room), [keep, drop]);
  assert.deepEqual([...listener.rooms.keys()], [keep]);
  const user = listener.welcome.user;
  let members = await other.presence(drop);
  for (let i = 0; i < 100 && members.some((m) => m.user === user); i++) {
    await sleep(50);
    members = await other.presence(drop);
  }
  assert.deepEqual(members.map((m) => m.user), [other.welcome.user], "the listener left the room it dropped");
});
