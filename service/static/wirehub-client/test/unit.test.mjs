// The client's pure parts: backoff, close-code policy, retry hints, JSON Patch.
import { test } from "node:test";
import assert from "node:assert/strict";
import { applyPatch, backoffDelay, closePolicy, parseRetryMs, CloseCode } from "wirehub-client";

const o = { backoffMin: 500, backoffMax: 30000 };

test("backoff is exponential with full jitter, capped", () => {
  assert.equal(backoffDelay(0, 500, 30000, () => 0), 0);
  assert.ok(backoffDelay(0, 500, 30000, () => 0.999) < 500);
  assert.equal(backoffDelay(3, 500, 30000, () => 0.5), 2000);
  assert.ok(backoffDelay(40, 500, 30000, () => 0.999) < 30000);
  const spread = new Set(Array.from({ length: 50 }, () => backoffDelay(4, 500, 30000)));
  assert.ok(spread.size > 40, "jittered");
});

test("retry hints are parsed from close reasons", () => {
  assert.equal(parseRetryMs("server going away; retry_ms=1234"), 1234);
  assert.equal(parseRetryMs("slow consumer; retry_ms=1000"), 1000);
  assert.equal(parseRetryMs("normal closure"), null);
  assert.equal(parseRetryMs(undefined), null);
});

test("close codes decide what happens next", () => {
  assert.deepEqual(closePolicy(CloseCode.GOING_AWAY, "server going away; retry_ms=700", 4, o),
    { reconnect: true, delay: 700, newToken: false });
  assert.equal(closePolicy(4008, "slow consumer; retry_ms=1000", 0, o).delay, 1000);
  assert.equal(closePolicy(4003, "forbidden", 0, o).reconnect, false);
  const expired = closePolicy(4001, "token expired", 0, o);
  assert.ok(expired.reconnect && expired.newToken && expired.delay < 500);
  for (let i = 0; i < 50; i++) {
    const limited = closePolicy(4029, "rate limited; retry_ms=2000", 0, o);
    assert.ok(limited.delay >= 2000 && limited.delay < 2000 + 4000, "the hint plus a longer backoff");
  }
  const dropped = closePolicy(1006, "", 2, o);
  assert.ok(dropped.reconnect && dropped.delay < 2000 && !dropped.newToken);
});

test("JSON Patch (RFC 6902) operations", () => {
  const doc = { a: 1, list: [1, 2, 3], nested: { x: "y" } };
  const out = applyPatch(doc, [
    { op: "add", path: "/b", value: { c: [1] } },
    { op: "add", path: "/list/1", value: 9 },
    { op: "add", path: "/list/-", value: 4 },
    { op: "replace", path: "/a", value: 2 },
    { op: "remove", path: "/list/0" },
    { op: "move", from: "/nested/x", path: "/moved" },
    { op: "copy", from: "/b", path: "/b2" },
    { op: "test", path: "/a", value: 2 },
    { op: "add", path: "/we~1ird~0key", value: true },
  ]);
  assert.deepEqual(out, { a: 2, list: [9, 2, 3, 4], nested: {}, b: { c: [1] }, b2: { c: [1] }, moved: "y", "we/ird~key": true });
  out.b.c.push(2);
  assert.deepEqual(out.b2, { c: [1] }, "copies are deep");
  assert.throws(() => applyPatch({ a: 1 }, [{ op: "test", path: "/a", value: 2 }]));
  assert.throws(() => applyPatch({}, [{ op: "remove", path: "/nope" }]));
  assert.throws(() => applyPatch({}, [{ op: "replace", path: "/nope", value: 1 }]));
  assert.throws(() => applyPatch({ l: [] }, [{ op: "add", path: "/l/5", value: 1 }]));
  assert.deepEqual(applyPatch({ a: 1 }, [{ op: "replace", path: "", value: [1] }]), [1]);
});
