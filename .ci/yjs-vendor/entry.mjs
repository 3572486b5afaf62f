// What the demo page imports from /static/vendor/yjs.js: the real yjs and y-websocket packages.
export * as Y from 'yjs'
export { WebsocketProvider } from 'y-websocket'
