"""The Lua scripts of the redis bus (see :mod:`wirehub.builtins.bus.redis` for what they keep true).

Each script touches the keys of one room only (all tagged ``{<room>}``, and the epoch base key of
the room's slot), so on a Redis Cluster every script runs on one slot.
"""

LUA_COMMON = """
-- KEYS[#KEYS] is the epoch base key (<key_prefix>:epoch; in a cluster one per slot, in the room's
-- slot); ARGV[#ARGV] is '1' in the failover modes (cluster, sentinel).
local BASE = KEYS[#KEYS]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- Failover modes: '.' + this primary's replication id. A replica that a failover promotes gets a new
-- one and may lack the newest writes, so a meta hash written under another id is stale (see live_meta).
local function shard_id()
  if ARGV[#ARGV] ~= '1' then return '' end
  local info = redis.call('INFO', 'replication')
  return '.' .. string.sub(string.match(info, 'master_replid:(%w+)'), 1, 12)
end
-- The epoch a room's next meta hash gets, which a room without one reports: "<base>.<window>[.<shard>]".
-- <base> is the value of BASE (made again after a flush or a restart without persistence); <window>
-- numbers meta_ttl-long windows of server time. A meta hash lives at least meta_ttl, so a room's next
-- one is in a later window: a new epoch.
local function next_epoch(candidate, meta_ttl, sid)
  local base = redis.call('GET', BASE)
  if not base then
    redis.call('SET', BASE, candidate)
    base = candidate
  end
  return base .. '.' .. string.format('%d', math.floor(now_ms() / meta_ttl)) .. sid
end
-- Whether the room has a meta hash of this primary's lineage; one from before a failover is dropped
-- with its stream (the room gets a new epoch: members are told of a gap, never a silent loss).
local function live_meta(sid)
  if redis.call('EXISTS', KEYS[2]) == 0 then return false end
  if sid ~= '' and redis.call('HGET', KEYS[2], 'sid') ~= sid then
    redis.call('DEL', KEYS[1], KEYS[2])
    return false
  end
  return true
end
local function ensure_meta(candidate, meta_ttl, sid)
  if not live_meta(sid) then
    redis.call('DEL', KEYS[1])
    redis.call('HSET', KEYS[2], 'epoch', next_epoch(candidate, meta_ttl, sid), 'top', 0, 'sid', sid)
  end
  redis.call('PEXPIRE', KEYS[2], meta_ttl)
end
-- Drops the entries older than horizon. The oldest entry alone is read first: in a room with traffic it is
-- fresh, and a batch of 64 (their payloads copied into Lua) at every publish was most of the script's CPU.
local function trim_age(horizon)
  local count = 1
  while true do
    local batch = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', count)
    count = 64
    if #batch == 0 then return end
    for i = 1, #batch do
      if tonumber(batch[i][2][2]) >= horizon then
        if i > 1 then redis.call('XTRIM', KEYS[1], 'MINID', batch[i][1]) end
        return
      end
    end
    local last = tonumber(string.match(batch[#batch][1], '^(%d+)'))
    redis.call('XTRIM', KEYS[1], 'MINID', string.format('%d-0', last + 1))
  end
end
"""

# KEYS: stream, meta, dedupe key (the meta key again when none), epoch base;
# ARGV: channel, payload, size, ttl_ms, epoch candidate, dedupe window ms (0 = none),
#       PUBLISH or SPUBLISH (cluster: sharded), failover flag
# -> {offset, 1 for a duplicate (nothing stored or sent) else 0}
PUBLISH = LUA_COMMON + """
local dedupe = tonumber(ARGV[6])
if dedupe > 0 then
  local seen = redis.call('GET', KEYS[3])
  if seen then return {tonumber(seen), 1} end
end
local ttl = tonumber(ARGV[4])
local now = now_ms()
ensure_meta(ARGV[5], 2 * ttl + 60000, shard_id())
local top = redis.call('HINCRBY', KEYS[2], 'top', 1)
local size = tonumber(ARGV[3])
if size > 0 then
  redis.call('XADD', KEYS[1], 'MAXLEN', size, string.format('%d-0', top), 't', now, 'd', ARGV[2])
  trim_age(now - ttl)
  redis.call('PEXPIRE', KEYS[1], ttl + 1000)
end
redis.call(ARGV[7], ARGV[1], string.format('%d ', top) .. ARGV[2])
if dedupe > 0 then redis.call('SET', KEYS[3], top, 'PX', dedupe) end
return {top, 0}
"""

# KEYS: stream, meta, epoch base; ARGV: after (-1 = newest), limit, ttl_ms, epoch base candidate, failover flag
# -> {epoch, top, complete, id1, data1, id2, data2, ...}. A room without a meta hash is read as
# empty and creates nothing (a client must not be able to make keys by reading unique rooms).
READ = LUA_COMMON + """
local ttl = tonumber(ARGV[3])
local after = tonumber(ARGV[1])
local sid = shard_id()
if not live_meta(sid) then
  local complete = 0
  if after <= 0 then complete = 1 end
  return {next_epoch(ARGV[4], 2 * ttl + 60000, sid), 0, complete}
end
redis.call('PEXPIRE', KEYS[2], 2 * ttl + 60000)
trim_age(now_ms() - ttl)
local epoch = redis.call('HGET', KEYS[2], 'epoch')
local top = tonumber(redis.call('HGET', KEYS[2], 'top'))
local limit = tonumber(ARGV[2])
local out = {epoch, top, 1}
local entries = {}
if after < 0 then
  if limit > 0 then
    local rev = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', limit)
    for i = #rev, 1, -1 do entries[#entries + 1] = rev[i] end
  end
else
  local oldest = top + 1
  local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
  if #first > 0 then oldest = tonumber(string.match(first[1][1], '^(%d+)')) end
  if after > top or after < oldest - 1 then
    out[3] = 0
  elseif limit > 0 and after < top then
    entries = redis.call('XRANGE', KEYS[1], string.format('%d-0', after + 1), '+', 'COUNT', limit)
  end
end
for i = 1, #entries do
  out[#out + 1] = entries[i][1]
  out[#out + 1] = entries[i][2][4]
end
return out
"""

# KEYS: stream, meta, epoch base; ARGV: ttl_ms, epoch base candidate, failover flag -> {top, epoch};
# creates nothing
POSITION = LUA_COMMON + """
local meta_ttl = 2 * tonumber(ARGV[1]) + 60000
local sid = shard_id()
if not live_meta(sid) then return {0, next_epoch(ARGV[2], meta_ttl, sid)} end
redis.call('PEXPIRE', KEYS[2], meta_ttl)
return {tonumber(redis.call('HGET', KEYS[2], 'top')), redis.call('HGET', KEYS[2], 'epoch')}
"""

# KEYS: state hash; ARGV: expected version, document json -> new version, or -1 - current
STATE_CAS = """
local v = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if v ~= tonumber(ARGV[1]) then return -1 - v end
redis.call('HSET', KEYS[1], 'v', v + 1, 'd', ARGV[2])
return v + 1
"""


SCRIPTS = {
    "publish": PUBLISH,
    "read": READ,
    "position": POSITION,
    "state_cas": STATE_CAS,
}
