// JSON Patch (RFC 6902): how a game room's state follows the server's `patch` events.

/** @param {string} pointer */
function parsePointer(pointer) {
  if (pointer === "") return [];
  if (pointer[0] !== "/") throw new Error(`bad JSON pointer ${pointer}`);
  return pointer.slice(1).split("/").map((t) => t.replace(/~1/g, "/").replace(/~0/g, "~"));
}

/** @param {any} a @param {any} b @returns {boolean} */
function deepEqual(a, b) {
  if (a === b) return true;
  if (typeof a !== "object" || typeof b !== "object" || a === null || b === null) return false;
  if (Array.isArray(a) !== Array.isArray(b)) return false;
  const ka = Object.keys(a), kb = Object.keys(b);
  return ka.length === kb.length && ka.every((k) => Object.prototype.hasOwnProperty.call(b, k) && deepEqual(a[k], b[k]));
}

/** @param {any} v */
const clone = (v) => (v === undefined ? undefined : JSON.parse(JSON.stringify(v)));

/**
 * Apply a JSON Patch to `doc` and return the result (`doc` itself is changed where possible).
 * Throws on an operation that does not apply.
 * @param {any} doc
 * @param {Array<{op: string, path: string, value?: any, from?: string}>} patch
 */
export function applyPatch(doc, patch) {
  for (const op of patch) doc = applyOp(doc, op);
  return doc;
}

/** @param {any} doc @param {{op: string, path: string, value?: any, from?: string}} op */
function applyOp(doc, op) {
  const tokens = parsePointer(op.path);
  if (op.op === "test") {
    if (!deepEqual(getAt(doc, tokens), op.value)) throw new Error(`test failed at ${op.path}`);
    return doc;
  }
  let value;
  if (op.op === "add" || op.op === "replace") value = clone(op.value);
  else if (op.op === "copy" || op.op === "move") {
    const from = parsePointer(/** @type {string} */ (op.from));
    value = clone(getAt(doc, from));
    if (op.op === "move") doc = removeAt(doc, from);
  } else if (op.op === "remove") return removeAt(doc, tokens);
  else throw new Error(`unknown patch op ${op.op}`);
  if (tokens.length === 0) return value;
  const parent = getAt(doc, tokens.slice(0, -1));
  const key = tokens[tokens.length - 1];
  if (Array.isArray(parent)) {
    const i = key === "-" ? parent.length : Number(key);
    if (!Number.isInteger(i) || i < 0 || i > parent.length) throw new Error(`bad index at ${op.path}`);
    if (op.op === "replace") {
      if (i >= parent.length) throw new Error(`no element at ${op.path}`);
      parent[i] = value;
    } else parent.splice(i, 0, value);
  } else if (parent !== null && typeof parent === "object") {
    if (op.op === "replace" && !(key in parent)) throw new Error(`no member at ${op.path}`);
    parent[key] = value;
  } else throw new Error(`no container at ${op.path}`);
  return doc;
}

/** @param {any} doc @param {string[]} tokens */
function getAt(doc, tokens) {
  let cur = doc;
  for (const t of tokens) {
    if (cur === null || typeof cur !== "object" || !(Array.isArray(cur) ? Number(t) < cur.length : t in cur)) {
      throw new Error(`no value at /${tokens.join("/")}`);
    }
    cur = cur[Array.isArray(cur) ? Number(t) : t];
  }
  return cur;
}

/** @param {any} doc @param {string[]} tokens */
function removeAt(doc, tokens) {
  if (tokens.length === 0) return undefined;
  const parent = getAt(doc, tokens.slice(0, -1));
  const key = tokens[tokens.length - 1];
  if (Array.isArray(parent)) {
    const i = Number(key);
    if (!Number.isInteger(i) || i < 0 || i >= parent.length) throw new Error(`no element at /${tokens.join("/")}`);
    parent.splice(i, 1);
  } else if (parent !== null && typeof parent === "object" && key in parent) delete parent[key];
  else throw new Error(`no member at /${tokens.join("/")}`);
  return doc;
}
