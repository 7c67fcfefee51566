-- The presence of one channel (wsrelay, src/broker/redis/nodes.rs).
-- KEYS[1] entries: a hash, client id -> entry (JSON); KEYS[2] expiries: a sorted set, client id
-- -> when the entry expires (ms, Redis's clock: one clock for every node).
-- ARGV: 1 operation; 2 where the channel's join and leave events go: "" when it has none, else
--       "P" (PUBLISH) or "S" (SPUBLISH, in a Redis Cluster) followed by the Pub/Sub channel;
--       3 an entry's time to live (ms: its node refreshes it every third of it).
--   "add"     4 most entries, 5 client id, 6 entry. Returns 1 added, 2 already there (entry
--             replaced), 0 full (not added).
--   "remove"  4 client id. Returns 1 removed, 0 not there.
--   "refresh" 4.. pairs of client id and entry: this node's entries of the channel get a new
--             expiry; one that is gone (Redis lost it, or the node was cut off past the time
--             to live and others saw it leave) is written again, with a join event. Returns
--             how many were written again.
--   "fill"    4 most entries, 5.. pairs of client id and entry, longest waiting first: this
--             node's subscribers past the bound, listed while there is room (each with a join
--             event). Returns the client ids now listed.
--   "read"    Returns every entry.
--   "stats"   Returns {entries, distinct users} (clients without a user count once each).
-- Every operation first removes the entries whose node stopped refreshing them (it died), each
-- with a leave event: the events of a dead node's subscribers come from whoever touches the
-- channel next (a refresh by another node, at the latest).
local entries, expiries = KEYS[1], KEYS[2]
local op, events, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)

-- A join ('j') or leave ('l') event for `entry`, where the channel has them.
local function event(kind, entry)
  if events ~= '' then
    local how = string.sub(events, 1, 1) == 'S' and 'SPUBLISH' or 'PUBLISH'
    redis.call(how, string.sub(events, 2), '\0wr1 ' .. kind .. ' - -\n' .. entry)
  end
end

-- Bounded: a channel with more expired entries is cleaned over several calls.
for _, client in ipairs(redis.call('ZRANGEBYSCORE', expiries, '-inf', now, 'LIMIT', 0, 1000)) do
  local entry = redis.call('HGET', entries, client)
  redis.call('HDEL', entries, client)
  redis.call('ZREM', expiries, client)
  if entry then
    event('l', entry)
  end
end

local function keep()
  redis.call('PEXPIRE', entries, ttl)
  redis.call('PEXPIRE', expiries, ttl)
end

if op == 'add' then
  local client, entry = ARGV[5], ARGV[6]
  local there = redis.call('HEXISTS', entries, client) == 1
  if not there and redis.call('HLEN', entries) >= tonumber(ARGV[4]) then
    return 0
  end
  redis.call('HSET', entries, client, entry)
  redis.call('ZADD', expiries, now + ttl, client)
  keep()
  if there then
    return 2
  end
  event('j', entry)
  return 1
elseif op == 'remove' then
  local client = ARGV[4]
  local entry = redis.call('HGET', entries, client)
  redis.call('HDEL', entries, client)
  redis.call('ZREM', expiries, client)
  if not entry then
    return 0
  end
  event('l', entry)
  return 1
elseif op == 'refresh' then
  local written = 0
  for i = 4, #ARGV, 2 do
    local client, entry = ARGV[i], ARGV[i + 1]
    redis.call('ZADD', expiries, now + ttl, client)
    if redis.call('HSETNX', entries, client, entry) == 1 then
      written = written + 1
      event('j', entry)
    end
  end
  keep()
  return written
elseif op == 'fill' then
  local max, listed = tonumber(ARGV[4]), {}
  for i = 5, #ARGV, 2 do
    local client, entry = ARGV[i], ARGV[i + 1]
    local there = redis.call('HEXISTS', entries, client) == 1
    if not there and redis.call('HLEN', entries) >= max then
      break
    end
    redis.call('HSET', entries, client, entry)
    redis.call('ZADD', expiries, now + ttl, client)
    if not there then
      event('j', entry)
    end
    listed[#listed + 1] = client
  end
  if #listed > 0 then
    keep()
  end
  return listed
elseif op == 'read' then
  return redis.call('HVALS', entries)
elseif op == 'stats' then
  local seen, users = {}, 0
  local all = redis.call('HVALS', entries)
  for _, e in ipairs(all) do
    local ok, v = pcall(cjson.decode, e)
    local key
    if ok and type(v) == 'table' then
      if type(v.user) == 'string' then
        key = 'u:' .. v.user
      elseif type(v.client) == 'string' then
        key = 'c:' .. v.client
      end
    end
    if key and not seen[key] then
      seen[key] = true
      users = users + 1
    end
  end
  return {#all, users}
end
return redis.error_reply('unknown presence operation ' .. tostring(op))
