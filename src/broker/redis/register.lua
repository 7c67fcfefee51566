-- Register this deployment's key prefix in a Redis shared with others (wsrelay,
-- src/broker/redis/mod.rs). Two deployments whose prefixes are not prefix-free (one starts
-- with the other, e.g. "" and "app:", or "a:" and "a:b:") can reach each other's channels
-- and keys, so the second one is refused.
-- KEYS[1] the registry, a sorted set: prefix -> last time a node of it registered (seconds).
-- ARGV: 1 this prefix, 2 now, 3 registrations older than this are stale (deployment gone).
-- Returns "" when registered, else the conflicting prefix as "=" .. prefix.
local registry, mine, now, stale = KEYS[1], ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', registry, '-inf', '(' .. stale)
-- Bounded: a registry filled by someone else cannot make this loop long.
for _, other in ipairs(redis.call('ZRANGE', registry, 0, 999)) do
  if other ~= mine and (string.sub(other, 1, #mine) == mine or string.sub(mine, 1, #other) == other) then
    return '=' .. other
  end
end
redis.call('ZADD', registry, now, mine)
return ''
