// /static/wirehub.js: the wirehub client for browsers and Node 20+, an ES module with no dependencies.
// Its source is the npm package in ./wirehub-client/ (`wirehub-client`, with .d.ts types): this file
// re-exports it, so `import { WirehubClient } from "/static/wirehub.js"` keeps working.
export * from "./wirehub-client/index.js";
export { default } from "./wirehub-client/index.js";
