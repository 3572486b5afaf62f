// Issue 12, defect 11: a room's position only moves forward in the JS client. A publisher sends a few
// hundred messages a second while clients join and have their connection dropped at once, twice: the
// `joined` reply and the messages after it arrive together, and a position taken from `joined` after
// those messages were handed to onMessage would make the rejoin deliver them again.
import { test, afterEach } from "node:test";
import assert from "node:assert/strict";
import { Subscription } from "wirehub-client";
import { client, closeAll, eventually, sleep, uniqueRoom } from "./helpers.mjs";

afterEach(() => closeAll());

const WORKERS = 5;
const ROUNDS = 6;

test("positions only move forward: joins bounced at once under ~300 msg/s get every message once", async () => {
  const room = uniqueRoom("pos");
  const pub = client("/ws/fastchat");
  await pub.join(room, () => {});
  const acked = [];
  let stop = false;
  const publishing = (async () => {
    for (let seq = 1; !stop; seq++) {
      acked.push((await pub.publish(room, { seq })).offset);
      await sleep(2);
    }
  })();
  await eventually(() => acked.length > 20, 5000, "the publisher runs");

  const results = [];
  const joinAndBounce = async () => {
    const c = client("/ws/fastchat");
    const got = [], joins = [];
    await c.join(room, (m) => got.push(m.offset), { onJoined: (info) => joins.push(info) });
    for (let n = 0; n < 2; n++) {
      if (Math.random() < 0.5) await sleep(Math.random() * 10);
      c._ws.close(4000, "test: bounce"); // right after joined: the messages after it are in flight
      await eventually(() => joins.length === n + 2, 5000, "the rejoin");
    }
    const target = acked[acked.length - 1] + 20;
    await eventually(() => got.length > 0 && got[got.length - 1] >= target, 5000, "catching up");
    c.close();
    results.push({ first: joins[0].offset, got, joins });
  };
  try {
    await Promise.all(Array.from({ length: WORKERS }, async () => {
      for (let i = 0; i < ROUNDS; i++) await joinAndBounce();
    }));
  } finally {
    stop = true;
    await publishing;
  }

  assert.equal(results.length, WORKERS * ROUNDS);
  let duplicates = 0, lost = 0;
  for (const { first, got, joins } of results) {
    duplicates += got.length - new Set(got).size;
    assert.deepEqual(got, [...got].sort((x, y) => x - y), "in order");
    const have = new Set(got);
    for (let o = first + 1; o <= got[got.length - 1]; o++) if (!have.has(o)) lost += 1;
    assert.deepEqual(joins.map((j) => j.recovered), [false, true, true], "the rejoins recovered");
  }
  assert.deepEqual({ duplicates, lost }, { duplicates: 0, lost: 0 });

  // a bystander on the same server is served
  const other = client("/ws/fastchat");
  const seen = [];
  await other.join(room, (m) => seen.push(m.data));
  await pub.publish(room, "bystander check");
  await eventually(() => seen.includes("bystander check"), 5000, "the bystander gets it");
});

test("a position moves forward within an epoch and starts over with a new one (gap)", () => {
  const c = client();
  const got = [];
  const sub = new Subscription(c, "r", (m) => got.push(m.data), { since: { offset: 10, epoch: "e1" } });
  sub.own.add(12);
  c.rooms.set("r", sub);
  c._onFrame({ op: "gap", room: "r", epoch: "e1", offset: 4 }); // an older offset: no move back
  assert.deepEqual(sub.position, { offset: 10, epoch: "e1" });
  c._onFrame({ op: "message", room: "r", offset: 10, data: "dup" });
  assert.deepEqual(got, []);
  c._onFrame({ op: "gap", room: "r", epoch: "e2", offset: 0 }); // the broker lost e1
  assert.deepEqual(sub.position, { offset: 0, epoch: "e2" });
  assert.equal(sub.own.size, 0);
  c._onFrame({ op: "message", room: "r", offset: 1, data: "new epoch" });
  assert.deepEqual(got, ["new epoch"]);
  assert.deepEqual(sub.position, { offset: 1, epoch: "e2" });
});
