-- A node's heartbeat in the registry of live nodes (wsrelay, src/broker/redis/nodes.rs).
-- KEYS[1] the registry: a sorted set, node id -> last heartbeat (ms, Redis's clock);
-- KEYS[2] this node's info: a hash; KEYS[3] this node's channels: a hash, channel -> local
-- subscribers (written by the caller, which only sends what changed).
-- ARGV: 1 node id; 2 a node not heard from for this long is gone (ms); then pairs of info
--       field and value.
-- A node that stops (or dies) leaves the registry, with its info and channels, `stale` after
-- its last heartbeat. Returns 0 when the channels hash does not exist (then the caller writes
-- it whole next time: Redis lost it, or it expired while the node could not reach Redis).
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local stale = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - stale)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('PEXPIRE', KEYS[1], stale)
redis.call('DEL', KEYS[2])
if #ARGV > 2 then
  redis.call('HSET', KEYS[2], unpack(ARGV, 3))
end
redis.call('PEXPIRE', KEYS[2], stale)
return redis.call('PEXPIRE', KEYS[3], stale)
