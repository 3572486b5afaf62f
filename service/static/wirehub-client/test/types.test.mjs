// The committed declarations (types/*.d.ts) are what `npm run types` writes from the JSDoc today.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync, rmSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = fileURLToPath(new URL("..", import.meta.url));

test("types/*.d.ts are current (run `npm run types` after changing the JSDoc)", () => {
  const tsc = createRequire(import.meta.url).resolve("typescript/bin/tsc");
  const out = mkdtempSync(join(tmpdir(), "wirehub-types-"));
  try {
    const run = spawnSync(process.execPath, [tsc, "-p", "tsconfig.types.json", "--outDir", out], { cwd: ROOT, encoding: "utf8" });
    assert.equal(run.status, 0, run.stdout + run.stderr);
    const fresh = readdirSync(out).sort();
    assert.deepEqual(readdirSync(join(ROOT, "types")).sort(), fresh);
    for (const name of fresh) {
      assert.equal(readFileSync(join(ROOT, "types", name), "utf8"), readFileSync(join(out, name), "utf8"), name);
    }
  } finally {
    rmSync(out, { recursive: true, force: true });
  }
});

test("the package's exports resolve to the sources and the declarations", async () => {
  const pkg = JSON.parse(readFileSync(join(ROOT, "package.json"), "utf8"));
  const byName = await import("wirehub-client");
  const bySource = await import("../index.js");
  assert.equal(byName.WirehubClient, bySource.WirehubClient);
  assert.equal(byName.default, byName.WirehubClient);
  assert.equal(pkg.exports["."].types, pkg.types);
  for (const file of [pkg.main, pkg.types]) readFileSync(join(ROOT, file));
});

test("npm pack ships the sources, the declarations and package.json, not the tests", () => {
  const npm = process.platform === "win32" ? "npm.cmd" : "npm";
  const run = spawnSync(npm, ["pack", "--dry-run", "--json", "--ignore-scripts"], { cwd: ROOT, encoding: "utf8" });
  assert.equal(run.status, 0, run.stderr);
  const files = JSON.parse(run.stdout)[0].files.map((/** @type {{path: string}} */ f) => f.path).sort();
  const sources = readdirSync(ROOT).filter((f) => f.endsWith(".js"));
  const types = readdirSync(join(ROOT, "types")).map((f) => `types/${f}`);
  assert.deepEqual(files, [...sources, ...types, "package.json", "README.md"].sort());
});
