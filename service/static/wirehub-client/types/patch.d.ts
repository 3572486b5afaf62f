/**
 * Apply a JSON Patch to `doc` and return the result (`doc` itself is changed where possible).
 * Throws on an operation that does not apply.
 * @param {any} doc
 * @param {Array<{op: string, path: string, value?: any, from?: string}>} patch
 */
export function applyPatch(doc: any, patch: Array<{
    op: string;
    path: string;
    value?: any;
    from?: string;
}>): any;
