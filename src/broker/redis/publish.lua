-- Publish one message with history, atomically (wsrelay, src/broker/redis/publisher.rs).
-- KEYS[1] meta hash {epoch, offset}; KEYS[2] stream of stored messages.
-- ARGV: 1 stream max length, 2 ttl seconds, 3 Pub/Sub channel, 4 kind ("t"/"b"), 5 payload,
--       6 this node's epoch prefix (random, chosen once per process),
--       7 "1" to refresh both keys' time to live (the caller asks at most once a second per
--       channel; a new history always gets it).
-- Returns {offset, epoch}.
--
-- Every call here costs Redis CPU, so the common case is four: HINCRBY, HGET, XADD, PUBLISH.
-- The offset is bumped first: its reply says nothing of the epoch, so the epoch is read next,
-- and only a missing epoch (new, expired or lost history: HINCRBY just created the hash)
-- creates one, from Redis's clock, so nothing random is sent per publish. The stream is trimmed
-- every 64th publish, approximately (whole stream nodes): it keeps at least max length entries
-- and at most about 64 + 100 more. tuning.md has its Redis CPU per publish beside the script
-- before it (six calls, and an exact trim on every publish).
local meta, stream = KEYS[1], KEYS[2]
local offset = redis.call('HINCRBY', meta, 'offset', 1)
local epoch = redis.call('HGET', meta, 'epoch')
local refresh = ARGV[7] == '1' or offset == 1
if not epoch then
  -- New or lost history: a new epoch, and no stale entries under it. Microseconds of Redis's
  -- clock after a per-node prefix: it differs from every earlier epoch of this channel.
  local t = redis.call('TIME')
  epoch = ARGV[6] .. string.format('%x', t[1] * 1000000 + t[2])
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'epoch', epoch)
  refresh = true
end
redis.call('XADD', stream, offset .. '-0', 'k', ARGV[4], 'd', ARGV[5])
if offset % 64 == 0 then
  redis.call('XTRIM', stream, 'MAXLEN', '~', ARGV[1])
end
if refresh then
  redis.call('EXPIRE', meta, ARGV[2])
  redis.call('EXPIRE', stream, ARGV[2])
end
redis.call('PUBLISH', ARGV[3], '\0wr1 ' .. ARGV[4] .. ' ' .. offset .. ' ' .. epoch .. '\n' .. ARGV[5])
return {offset, epoch}
