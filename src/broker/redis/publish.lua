-- Publish one message with history, atomically (wsrelay, src/broker/redis/publisher.rs).
-- KEYS[1] meta hash {epoch, offset}; KEYS[2] stream of stored messages.
-- ARGV: 1 stream max length, 2 ttl seconds, 3 Pub/Sub channel, 4 kind ("t"/"b"), 5 payload,
--       6 epoch to use if the channel has none (random, chosen by the caller).
-- Returns {offset, epoch}.
local meta, stream = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  -- New or lost history: a new epoch, and no stale entries under it.
  epoch = ARGV[6]
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'epoch', epoch)
end
local offset = redis.call('HINCRBY', meta, 'offset', 1)
redis.call('XADD', stream, 'MAXLEN', ARGV[1], offset .. '-0', 'k', ARGV[4], 'd', ARGV[5])
redis.call('EXPIRE', meta, ARGV[2])
redis.call('EXPIRE', stream, ARGV[2])
redis.call('PUBLISH', ARGV[3], '\0wr1 ' .. ARGV[4] .. ' ' .. offset .. ' ' .. epoch .. '\n' .. ARGV[5])
return {offset, epoch}
