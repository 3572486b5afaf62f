// Presence of big rooms in the JS client: joined's bounded list, count and cursor, paging, the count-only
// form, and presence.diff applied to the subscription's members and count. The server's big-* rooms
// list 3 members in joined and send one presence.diff per room per 0.2 s (tests/test_js_client.py).
import { test, afterEach } from "node:test";
import assert from "node:assert/strict";
import { Subscription, WirehubError, applyPresenceEvent, takePresenceSnapshot } from "wirehub-client";
import { client, closeAll, eventually, uniqueRoom } from "./helpers.mjs";

afterEach(() => closeAll());

/**
 * A big room with `n` other members, and this test's own client joined last.
 * @param {number} n
 */
async function crowded(n) {
  const room = uniqueRoom("big");
  const others = [];
  for (let i = 0; i < n; i++) {
    const c = client();
    await c.join(room, () => {});
    others.push(c);
  }
  const me = client();
  const sub = await me.join(room, () => {});
  return { room, others, me, sub };
}

test("bounded joined, paging with a cursor, count only", async () => {
  const { room, others, me, sub } = await crowded(5);
  assert.deepEqual(sub.count, { users: 6, connections: 6 });
  assert.equal(sub.presence.length, 3);
  assert.equal(sub.members.size, 3);
  assert.equal(typeof sub.cursor, "string");

  const everyone = sub.presence.map((m) => m.user);
  let cursor = sub.cursor;
  while (cursor !== null) {
    const page = await me.presencePage(room, { after: cursor, limit: 2 });
    assert.deepEqual(page.count, { users: 6, connections: 6 });
    everyone.push(...page.members.map((m) => m.user));
    cursor = page.cursor;
  }
  const expected = [...others, me].map((c) => c.welcome.user).sort();
  assert.deepEqual(everyone, expected, "every member once, in user order");
  assert.deepEqual((await me.presence(room)).map((m) => m.user), expected.slice(0, 3));
  assert.deepEqual(await me.presenceCount(room), { users: 6, connections: 6 });
  await assert.rejects(me.presencePage(room, { limit: 0 }),
    (err) => err instanceof WirehubError && err.code === "bad_request" && err.message === "field 'limit' must be an integer from 1 to 1000");
});

test("presence.diff updates members and count", async () => {
  const room = uniqueRoom("big");
  const a = client();
  const events = [];
  const sub = await a.join(room, () => {}, { onPresence: (ev) => events.push(ev) });
  await eventually(() => events.length === 1, 5000, "the diff of our own join");
  assert.deepEqual(events[0], { op: "presence.diff", room, joins: [{ user: a.welcome.user, name: a.welcome.user }],
    leaves: [], count: { users: 1, connections: 1 } });

  const b = client(), c = client();
  await b.join(room, () => {});
  await c.join(room, () => {});
  await eventually(() => sub.members.size === 3 && sub.count.users === 3, 5000, "b and c joined");
  await b.leave(room);
  await eventually(() => !sub.members.has(b.welcome.user) && sub.count.users === 2, 5000, "b left");
  assert.deepEqual([...sub.members.keys()].sort(), [a.welcome.user, c.welcome.user].sort());
  assert.ok(events.every((ev) => ev.op === "presence.diff"));
});

test("a truncated diff reloads the members from the room's first page", async () => {
  const { room, me, sub } = await crowded(4);
  const listed = [...sub.members.keys()];
  sub.members.set("ghost", { user: "ghost", connections: 1 }); // what a dead replica's unsent diff left behind
  sub.members.delete(listed[0]);
  me._dispatch({ op: "presence.diff", room, joins: [], leaves: ["gone"], count: { users: 5, connections: 5 },
    truncated: true });
  await eventually(() => !sub.members.has("ghost") && sub.members.has(listed[0]), 5000, "the list reloaded");
  assert.deepEqual([...sub.members.keys()].sort(), [...listed].sort());
  assert.deepEqual(sub.count, { users: 5, connections: 5 });
});

test("applying events and diffs: idempotent joins, count from the server", () => {
  const sub = new Subscription(/** @type {any} */ (null), "big-1", () => {}, {});
  takePresenceSnapshot(sub, { presence: [{ user: "ann", connections: 2 }, { user: "bea", connections: 1 }],
    count: { users: 40, connections: 45 }, cursor: "bea" });
  assert.equal(sub.cursor, "bea");
  applyPresenceEvent(sub, { op: "presence.diff", room: "big-1", joins: [{ user: "bea" }, { user: "cid", name: "Cid" }],
    leaves: ["ann", "zed"], count: { users: 41, connections: 46 } });
  assert.deepEqual([...sub.members.keys()].sort(), ["bea", "cid"]);
  assert.deepEqual(sub.members.get("cid"), { user: "cid", name: "Cid", connections: 1 });
  assert.deepEqual(sub.count, { users: 41, connections: 46 });
  applyPresenceEvent(sub, { op: "presence.join", room: "big-1", user: "dan" });
  assert.equal(sub.count.users, 42);
  applyPresenceEvent(sub, { op: "presence.leave", room: "big-1", user: "dan" });
  assert.equal(sub.count.users, 41);
  assert.ok(!sub.members.has("dan"));
  applyPresenceEvent(sub, { op: "presence.leave", room: "big-1", user: "eve" });  // unlisted, the list partial
  assert.equal(sub.count.users, 40);
  // a whole list: a repeated event counts once
  takePresenceSnapshot(sub, { presence: [{ user: "ann", connections: 1 }], count: { users: 1, connections: 1 } });
  applyPresenceEvent(sub, { op: "presence.join", room: "big-1", user: "bob" });
  applyPresenceEvent(sub, { op: "presence.join", room: "big-1", user: "bob" });
  applyPresenceEvent(sub, { op: "presence.leave", room: "big-1", user: "bob" });
  applyPresenceEvent(sub, { op: "presence.leave", room: "big-1", user: "bob" });
  assert.equal(sub.count.users, 1);
  assert.deepEqual([...sub.members.keys()], ["ann"]);
  // a repeated join keeps what the list knew; with the whole list its count is not needed
  applyPresenceEvent(sub, { op: "presence.join", room: "big-1", user: "ann", count: { users: 7, connections: 9 } });
  assert.deepEqual(sub.members.get("ann"), { user: "ann", connections: 1 });
  assert.equal(sub.count.users, 1);
  // a partial list: u counted but not listed left through A and came back through B; the bus had B's join,
  // A's leave, then A's correction with the room's count
  takePresenceSnapshot(sub, { presence: [{ user: "ann", connections: 2 }], count: { users: 10, connections: 12 } });
  for (const ev of [{ op: "presence.join", room: "big-1", user: "u" }, { op: "presence.leave", room: "big-1", user: "u" },
    { op: "presence.join", room: "big-1", user: "u", count: { users: 10, connections: 12 } }]) applyPresenceEvent(sub, ev);
  assert.ok(sub.members.has("u"));
  assert.deepEqual(sub.count, { users: 10, connections: 12 });
  // a repeated event's count was read a round trip before it came: never below the users listed
  takePresenceSnapshot(sub, { presence: [{ user: "w", connections: 1 }], count: { users: 2, connections: 2 } });
  for (const ev of [{ op: "presence.join", room: "big-1", user: "a" }, { op: "presence.leave", room: "big-1", user: "a" },
    { op: "presence.join", room: "big-1", user: "z" },
    { op: "presence.join", room: "big-1", user: "a", count: { users: 2, connections: 2 } }]) applyPresenceEvent(sub, ev);
  assert.deepEqual([...sub.members.keys()].sort(), ["a", "w", "z"]);
  assert.deepEqual(sub.count, { users: 3, connections: 3 });
  takePresenceSnapshot(sub, {});  // presence off for the room
  assert.equal(sub.count, null);
  assert.equal(sub.members.size, 0);
});
