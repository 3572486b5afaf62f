// wirehub's yjs endpoint with the real yjs / y-websocket / ws packages, against two `wirehub serve`
// replicas on one bus (Redis or NATS). tests/test_yjs_node.py starts the replicas and runs this file
// with:
//   WIREHUB_REPLICAS  comma-separated base URLs (http://127.0.0.1:port) of the replicas
//   WIREHUB_CONTROL   a control server: POST /restart (every replica, SIGTERM then start),
//                     POST /kill {replica}, POST /start {replica}
//   TOKEN_RW, TOKEN_RO  JWTs: read-write ("*"), and read-only ("read:*")
//   AWARENESS_TTL     the endpoint's awareness_ttl, seconds
import { test, after } from 'node:test'
import assert from 'node:assert/strict'
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import WebSocket from 'ws'

const replicas = process.env.WIREHUB_REPLICAS.split(',')
const control = process.env.WIREHUB_CONTROL
const ttl = Number(process.env.AWARENESS_TTL)
const providers = []

const wsUrl = (i) => replicas[i].replace(/^http/, 'ws') + '/ws/yjs'
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))
const unique = (name) => `${name}-${process.pid}-${Math.random().toString(36).slice(2, 8)}`

function connect (replica, room, { token = process.env.TOKEN_RW, doc = new Y.Doc() } = {}) {
  const provider = new WebsocketProvider(wsUrl(replica), room, doc, {
    WebSocketPolyfill: WebSocket, params: { token }, disableBc: true, maxBackoffTime: 300
  })
  providers.push(provider)
  return provider
}

async function until (check, what, timeout = 10000) {
  const deadline = Date.now() + timeout
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await sleep(20)
  }
}

const synced = (p) => until(() => p.synced, `${p.roomname} synced on ${p.url}`)
const text = (p) => p.doc.getText('t').toString()

async function post (action, body = {}) {
  const resp = await fetch(`${control}/${action}`, { method: 'POST', body: JSON.stringify(body) })
  assert.equal(resp.status, 200, `control ${action}`)
}

function randomEdits (p, n, seed) {
  const t = p.doc.getText('t')
  let x = seed
  const rand = (m) => { x = (x * 1103515245 + 12345) % 2147483648; return x % m }
  for (let i = 0; i < n; i++) {
    if (t.length > 5 && rand(4) === 0) t.delete(rand(t.length - 2), 1 + rand(2))
    else t.insert(rand(t.length + 1), String.fromCharCode(97 + rand(26)).repeat(1 + rand(3)))
  }
}

// the awareness has a timer of its own that the provider's destroy() leaves running
const destroy = (p) => { p.destroy(); p.awareness.destroy() }
after(() => { for (const p of providers) destroy(p) })

test('two providers on two replicas converge on random concurrent edits', async () => {
  const room = unique('converge')
  const a = connect(0, room)
  const b = connect(1, room)
  await Promise.all([synced(a), synced(b)])
  for (let round = 0; round < 20; round++) {
    randomEdits(a, 5, 1 + round)
    randomEdits(b, 5, 1000 + round)
    await sleep(round % 3 === 0 ? 0 : 10)
  }
  await until(() => text(a) === text(b) && text(a).length > 0, 'both texts equal')
  // a third provider, on the other replica, loads the same document from the backend
  const c = connect(0, room)
  await synced(c)
  await until(() => text(c) === text(a), 'the late provider has the same text')
})

test('offline edits merge after a reconnect', async () => {
  const room = unique('offline')
  const a = connect(0, room)
  const b = connect(1, room)
  await Promise.all([synced(a), synced(b)])
  a.doc.getText('t').insert(0, 'shared ')
  await until(() => text(b) === 'shared ', 'b has the shared text')
  b.disconnect()
  b.doc.getText('t').insert(text(b).length, 'offline-b')
  a.doc.getText('t').insert(0, 'online-a ')
  await sleep(200)
  assert.ok(!text(a).includes('offline-b'), 'b was really offline')
  b.connect()
  await synced(b)
  await until(() => text(a) === text(b), 'a and b converge after the reconnect')
  assert.ok(text(a).includes('offline-b') && text(a).includes('online-a') && text(a).includes('shared'))
})

test('a read-only client cannot change the document', async () => {
  const room = unique('readonly')
  const writer = connect(0, room)
  const reader = connect(1, room, { token: process.env.TOKEN_RO })
  await Promise.all([synced(writer), synced(reader)])
  writer.doc.getText('t').insert(0, 'from the writer')
  await until(() => text(reader) === 'from the writer', 'the reader sees the writer')
  const denied = []
  const original = reader.messageHandlers[2]
  reader.messageHandlers[2] = (encoder, decoder, provider, emitSynced, type) => {
    denied.push(decoder.arr.slice(decoder.pos))
    original(encoder, decoder, provider, emitSynced, type)
  }
  const warn = console.warn
  console.warn = () => {}
  try {
    reader.doc.getText('t').insert(0, 'VANDAL ')
    await until(() => denied.length > 0, 'permission denied from the server')
  } finally {
    console.warn = warn
  }
  await sleep(300)
  assert.equal(text(writer), 'from the writer')
  const fresh = connect(1, room)
  await synced(fresh)
  await sleep(100)
  assert.equal(text(fresh), 'from the writer')
})

test('a restart of every replica keeps the document', async () => {
  const room = unique('restart')
  const a = connect(0, room)
  await synced(a)
  a.doc.getText('t').insert(0, 'survives restarts')
  const b = connect(1, room)
  await synced(b)
  await until(() => text(b) === 'survives restarts', 'b has the text before the restart')
  destroy(a)
  destroy(b)
  await post('restart')
  const c = connect(1, room)
  await synced(c)
  assert.equal(text(c), 'survives restarts')
})

test("awareness of a killed replica's client expires", async () => {
  const room = unique('awareness')
  const a = connect(0, room)
  const b = connect(1, room)
  await Promise.all([synced(a), synced(b)])
  a.awareness.setLocalStateField('user', { name: 'alice', cursor: 3 })
  const aid = a.doc.clientID
  await until(() => b.awareness.getStates().get(aid)?.user?.name === 'alice', "b sees alice's cursor")
  a.shouldConnect = false // the client stays (no goodbye): only its replica dies
  const killedAt = Date.now()
  await post('kill', { replica: 0 })
  await until(() => !b.awareness.getStates().has(aid), "alice's state removed", (ttl + 10) * 1000)
  // y-protocols itself drops a state after 30 s without renewal: the server's TTL came first
  assert.ok(Date.now() - killedAt < 25000, `expired after ${Date.now() - killedAt} ms`)
  await post('start', { replica: 0 })
})
