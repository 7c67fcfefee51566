-- Replace a session's stored state (wsrelay, src/broker/redis/requests.rs).
-- KEYS[1] session hash; KEYS[2], when the session has a token subject, that subject's index
-- (a sorted set of its session keys by last save).
-- ARGV: 1 ttl seconds; 2 "" or "=" followed by the token subject; 3 most sessions kept per
--       subject; 4 now (milliseconds); then pairs of a channel's field ("c:<channel>") and its
--       position ("<offset> <epoch>"), or "" when the position is not known yet: then the
--       position stored for that channel (recorded by read.lua as it was read) is kept, or
--       "0 -" stored.
-- Fields of channels not listed are removed. Returns the keys of the subject's sessions saved
-- longest ago past the cap (the caller deletes them).
local key = KEYS[1]
local wanted = {}
for i = 5, #ARGV, 2 do
  wanted[ARGV[i]] = ARGV[i + 1]
end
for _, field in ipairs(redis.call('HKEYS', key)) do
  if wanted[field] == nil then
    redis.call('HDEL', key, field)
  end
end
for field, position in pairs(wanted) do
  if position == '' then
    redis.call('HSETNX', key, field, '0 -')
  else
    redis.call('HSET', key, field, position)
  end
end
redis.call('HSET', key, 'v', 1)
if ARGV[2] ~= '' then
  redis.call('HSET', key, 'sub', string.sub(ARGV[2], 2))
end
redis.call('EXPIRE', key, ARGV[1])
local index = KEYS[2]
if not index then
  return {}
end
redis.call('ZADD', index, ARGV[4], key)
redis.call('EXPIRE', index, ARGV[1])
local over = redis.call('ZCARD', index) - tonumber(ARGV[3])
if over <= 0 then
  return {}
end
local oldest = redis.call('ZRANGE', index, 0, over - 1)
redis.call('ZREM', index, unpack(oldest))
return oldest
