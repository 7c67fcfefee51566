-- Index a session under its token subject, in a Redis Cluster (wsrelay,
-- src/broker/redis/requests.rs): save.lua does this itself on one Redis, but in a cluster the
-- index and the session are in different slots.
-- KEYS[1] the subject's index (a sorted set of its session keys by last save).
-- ARGV: 1 ttl seconds; 2 most sessions kept per subject; 3 now (milliseconds); 4 the session key.
-- Returns the keys of the subject's sessions saved longest ago past the cap (the caller
-- deletes them).
local index = KEYS[1]
redis.call('ZADD', index, ARGV[3], ARGV[4])
redis.call('EXPIRE', index, ARGV[1])
local over = redis.call('ZCARD', index) - tonumber(ARGV[2])
if over <= 0 then
  return {}
end
local oldest = redis.call('ZRANGE', index, 0, over - 1)
redis.call('ZREM', index, unpack(oldest))
return oldest
