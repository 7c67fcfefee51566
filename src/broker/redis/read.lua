-- Read a channel's position and stored messages (wsrelay, src/broker/redis/requests.rs).
-- KEYS[1] meta hash; KEYS[2] stream; KEYS[3], when given, a session hash that records the
-- position read (a subscription starting now: stored before anyone can see the position).
-- ARGV: 1 first stream id to return ("N-0"), "newest" for the newest entries, or "" for the
--       position only; 2 most entries to return (a page: the caller asks again after the last
--       one);
--       3 epoch to create if the channel has none; 4 ttl seconds for a created meta hash;
--       with KEYS[3]: 5 the session's field for the channel ("c:<channel>"), 6 session ttl
--       seconds, 7 "" or "=" followed by the session's token subject.
-- Returns {top offset, epoch, entries}. Creating the epoch here fixes it at subscription time,
-- so a client that subscribed before the first publish can still recover from offset 0.
local meta, stream = KEYS[1], KEYS[2]
if redis.call('HSETNX', meta, 'epoch', ARGV[3]) == 1 then
  -- A new epoch starts at offset 0 (nothing published), also when someone else removed only
  -- the epoch and left an offset.
  redis.call('HDEL', meta, 'offset', 'bytes')
  redis.call('DEL', stream)
  redis.call('EXPIRE', meta, ARGV[4])
end
local epoch = redis.call('HGET', meta, 'epoch')
local top = redis.call('HGET', meta, 'offset') or '0'
local entries = {}
-- COUNT 0 answers nil (not an empty list): a limit of 0 reads the position alone.
if tonumber(ARGV[2]) == 0 then
  -- nothing to read
elseif ARGV[1] == 'newest' then
  -- Newest first from Redis: turned around, oldest first like every other read.
  local newest = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', ARGV[2])
  for i = #newest, 1, -1 do
    entries[#entries + 1] = newest[i]
  end
elseif ARGV[1] ~= '' then
  entries = redis.call('XRANGE', stream, ARGV[1], '+', 'COUNT', ARGV[2])
end
local session = KEYS[3]
if session then
  redis.call('HSET', session, ARGV[5], top .. ' ' .. epoch, 'v', 1)
  if ARGV[7] ~= '' then
    redis.call('HSET', session, 'sub', string.sub(ARGV[7], 2))
  end
  redis.call('EXPIRE', session, ARGV[6])
end
return {top, epoch, entries}
