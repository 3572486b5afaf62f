// The Node baseline of bench/bench_conns.py: Node 20 + ws 8 speaking the JSON of wirehub's /ws/echo and
// /ws/chat (the same shapes as bench/baseline_server.py), so bench/loadgen.py drives it unchanged.
//
//   node bench/node_ws/server.js --port 8082 [--backlog 1024] [--ping-interval 20]
//
// /ws/echo: every JSON text comes back as {"echo": <it>}; /ws/chat: welcome on open, join -> joined,
// publish -> ack to the sender and message to every other member (encoded once, sent with ws.send).
// Keepalive is ws's documented heartbeat (one interval for all clients, terminate whoever missed the
// last ping), at wirehub's default interval; --ping-interval 0 turns it off.
'use strict';
const http = require('http');
const crypto = require('crypto');
const { WebSocketServer } = require('ws');

function arg(name, dflt) {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : dflt;
}
const port = Number(arg('--port', '8082'));
const host = arg('--host', '127.0.0.1');
const backlog = Number(arg('--backlog', '1024'));
const pingInterval = Number(arg('--ping-interval', '20'));

const rooms = new Map(); // room -> Set of sockets
const offsets = new Map();

function echo(ws, data, isBinary) {
  let obj;
  try {
    obj = JSON.parse(data.toString());
  } catch (e) {
    ws.send(JSON.stringify({ op: 'error', code: 'bad_json', message: 'frame is not valid JSON' }));
    return;
  }
  ws.send(JSON.stringify({ echo: obj }));
}

function chat(ws, data) {
  let req;
  try {
    req = JSON.parse(data.toString());
  } catch (e) {
    ws.send(JSON.stringify({ op: 'error', code: 'bad_request', message: 'bad request' }));
    return;
  }
  const room = req.room;
  if (req.op === 'join') {
    let members = rooms.get(room);
    if (!members) rooms.set(room, (members = new Set()));
    members.add(ws);
    ws.rooms.add(room);
    ws.send(JSON.stringify({ op: 'joined', id: req.id, room, offset: offsets.get(room) || 0,
      epoch: 'node', recovered: false, presence: [] }));
  } else if (req.op === 'publish') {
    if (!ws.rooms.has(room)) {
      ws.send(JSON.stringify({ op: 'error', id: req.id, code: 'not_joined', message: 'join the room first' }));
      return;
    }
    const offset = (offsets.get(room) || 0) + 1;
    offsets.set(room, offset);
    // the offset last, as wirehub splices it in (bench/rooms_load.py reads it from the frame's end)
    const msg = JSON.stringify({ op: 'message', room, from: ws.user, data: req.data, ts: Date.now() / 1000, offset });
    for (const c of rooms.get(room)) if (c !== ws) c.send(msg);
    ws.send(JSON.stringify({ op: 'ack', id: req.id, offset }));
  } else {
    ws.send(JSON.stringify({ op: 'error', id: req.id, code: 'unknown_op', message: String(req.op) }));
  }
}

const server = http.createServer((req, res) => {
  if (req.url === '/healthz') { res.writeHead(200); res.end('ok'); return; }
  res.writeHead(404); res.end();
});
const wss = new WebSocketServer({ noServer: true, perMessageDeflate: false, maxPayload: 1 << 20 });

server.on('upgrade', (req, socket, head) => {
  const path = req.url.split('?')[0];
  if (path !== '/ws/echo' && path !== '/ws/chat') { socket.destroy(); return; }
  wss.handleUpgrade(req, socket, head, (ws) => {
    ws.isAlive = true;
    ws.on('pong', () => { ws.isAlive = true; });
    if (path === '/ws/echo') {
      ws.on('message', (data, isBinary) => echo(ws, data, isBinary));
    } else {
      ws.id = crypto.randomBytes(8).toString('hex');
      ws.user = 'guest-' + ws.id.slice(0, 8);
      ws.rooms = new Set();
      ws.on('message', (data) => chat(ws, data));
      ws.on('close', () => { for (const r of ws.rooms) rooms.get(r).delete(ws); });
      ws.send(JSON.stringify({ op: 'welcome', v: 1, session: ws.id, user: ws.user, node: 'node' }));
    }
  });
});

if (pingInterval > 0) {
  setInterval(() => {
    for (const ws of wss.clients) {
      if (ws.isAlive === false) { ws.terminate(); continue; }
      ws.isAlive = false;
      ws.ping();
    }
  }, pingInterval * 1000);
}

server.listen({ port, host, backlog }, () => console.log(`node ws listening on ${host}:${port}`));
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => process.exit(0));
