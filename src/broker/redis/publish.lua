-- Publish messages with history, each atomically (wsrelay, src/broker/redis/publisher.rs).
-- One call publishes several messages (up to 16, in order; one in a Redis Cluster): the
-- script's own cost is paid once per call, not per message.
-- KEYS: for the i-th publish, KEYS[2i-1] its channel's meta hash {epoch, offset, bytes} and
--   KEYS[2i] its stream of stored messages; when their count is odd, the last is the
--   publisher's progress marker (one Redis, the last call of a pipelined batch).
-- ARGV: 1 stream max length, 2 ttl seconds, 3 this node's epoch prefix (random, chosen once per
--   process), 4 the byte budget of large messages, 5 the size above which a message is large,
--   6 the publish command (PUBLISH, or SPUBLISH in a cluster), 7 and 8 in a Redis Cluster the
--   primary's replication ids (master_replid and master_replid2 of INFO replication), empty
--   otherwise; then five per publish, from 8 + 5(i-1): +1 the Pub/Sub channel, +2 kind
--   ("t"/"b"), +3 payload, +4 "1" to refresh both keys' time to live (the caller asks at most
--   once a second per channel; a new history always gets it), "2" to refresh and first look for
--   this publish's tag among the newest entries (a retry after a lost connection, see below),
--   "0" otherwise, +5 this publish's tag (one Redis: the publisher's random id and the
--   publish's number; empty in a cluster), kept with the entry.
-- Returns, per publish in order, {offset, epoch}, or the error that stopped it (the others
-- still run, as if each were its own call).
--
-- Every call here costs Redis CPU, so the common case is four per publish: HINCRBY, HGET,
-- XADD, PUBLISH (five in a cluster: the HGET of `gen` below).
-- The offset is bumped first: its reply says nothing of the epoch, so the epoch is read next,
-- and only a missing epoch (new, expired or lost history: HINCRBY just created the hash)
-- creates one, from Redis's clock, so nothing random is sent per publish. The stream is trimmed
-- every 64th publish, approximately (whole stream nodes): it keeps at least max length entries
-- and at most about 64 + 100 more. tuning.md has its Redis CPU per publish beside the script
-- before it (six calls, and an exact trim on every publish, one publish per call).
--
-- Bytes: the meta's `bytes` counts the payload of the large messages the stream holds (one
-- HINCRBY per large publish; small ones cost nothing more). Past the budget, the oldest
-- messages go, exactly, until it is met again; every 64th publish of a channel holding large
-- messages trims by count the same way, so the count stays right. Small messages, at most
-- max length + 164 of them, fill at most the other half of the channel's byte cap (the caller
-- picks ARGV[5] so). A count that has gone wrong (someone else removed entries) is set right
-- when trimming reaches the newest message without meeting the budget.
local maxlen, ttl, prefix = ARGV[1], ARGV[2], ARGV[3]
local budget, large = tonumber(ARGV[4]), tonumber(ARGV[5])
local publish, replid, replid2 = ARGV[6], ARGV[7], ARGV[8]

-- New or lost history: a new epoch, and no stale entries under it; it starts at offset 1, also
-- when someone else removed only the epoch (the offset HINCRBY just bumped is then the old
-- one's). Microseconds of Redis's clock after a per-node prefix: it differs from every earlier
-- epoch of this channel.
local function new_epoch(meta, stream)
  local t = redis.call('TIME')
  local epoch = prefix .. string.format('%x', t[1] * 1000000 + t[2])
  redis.call('DEL', stream)
  redis.call('HDEL', meta, 'bytes')
  redis.call('HSET', meta, 'epoch', epoch, 'offset', 1)
  return epoch
end

-- XADD of one message (with its tag, if any); with `existing`, only to a stream that exists
-- (false when it does not). An error is returned, not raised.
local function append(stream, id, kind, payload, tag, existing)
  if existing then
    if tag ~= '' then
      return redis.pcall('XADD', stream, 'NOMKSTREAM', id, 'k', kind, 'd', payload, 'p', tag)
    end
    return redis.pcall('XADD', stream, 'NOMKSTREAM', id, 'k', kind, 'd', payload)
  end
  if tag ~= '' then
    return redis.pcall('XADD', stream, id, 'k', kind, 'd', payload, 'p', tag)
  end
  return redis.pcall('XADD', stream, id, 'k', kind, 'd', payload)
end

-- The ID of the entry of `stream` holding `tag` among the newest, or nil (a retry's search, see
-- `one`). A tag is the publisher's id (8 characters) and the publish's number: an earlier
-- number of the same publisher means this one is not stored (it would be newer). At most 1024
-- entries are read, 16 at a time.
local function stored(stream, tag)
  local mine, seq = string.sub(tag, 1, 8), tonumber(string.sub(tag, 9)) or 0
  local from, seen = '+', 0
  while seen < 1024 do
    local batch = redis.call('XREVRANGE', stream, from, '-', 'COUNT', 16)
    for i = 1, #batch do
      local f = batch[i][2]
      for j = 1, #f - 1, 2 do
        if f[j] == 'p' then
          local t = f[j + 1]
          if t == tag then
            return batch[i][1]
          end
          if string.sub(t, 1, 8) == mine and (tonumber(string.sub(t, 9)) or 0) < seq then
            return nil
          end
        end
      end
    end
    if #batch < 16 then
      return nil
    end
    seen = seen + #batch
    from = '(' .. batch[#batch][1]
  end
  return nil
end

local function one(meta, stream, channel, kind, payload, flag, tag)
  if replid ~= '' then
    -- Failover (cluster): the meta's `gen` names the replication id of the primary that wrote it
    -- last. If this primary's previous replication id is that one, it was promoted from a
    -- replica of that writer, and replication is asynchronous: it may lack the writer's last
    -- publishes, whose offsets clients already hold under this epoch. Offsets must not be
    -- reused: the history starts again under a new epoch (clients are told recovered: false).
    -- Any other writer (a slot migrated here, nothing written since an older failover) needs
    -- nothing.
    local gen = redis.call('HGET', meta, 'gen')
    if gen ~= replid then
      if gen and gen == replid2 then
        redis.call('DEL', meta, stream)
      end
      redis.call('HSET', meta, 'gen', replid)
    end
  end
  if flag == '2' and tag ~= '' then
    -- A retry after a lost connection: this publish may have run before the connection went
    -- (Redis runs a connection's commands in order: what ran is the first of those sent). Found
    -- stored, it is answered as it was then, and nothing is stored or published twice. Only
    -- retries pay for this read.
    local epoch = redis.call('HGET', meta, 'epoch')
    local id = epoch and stored(stream, tag)
    if id then
      return {tonumber(string.match(id, '^%d+')), epoch}
    end
  end
  local offset = redis.call('HINCRBY', meta, 'offset', 1)
  local epoch = redis.call('HGET', meta, 'epoch')
  local refresh = flag ~= '0' or offset == 1
  if not epoch then
    epoch, offset = new_epoch(meta, stream), 1
    refresh = true
  end
  local id = offset .. '-0'
  -- Past its first offset an epoch's stream exists: appended to only if it does.
  local added = append(stream, id, kind, payload, tag, offset > 1)
  if not added or (type(added) == 'table' and added.err) then
    if added and not string.find(added.err, 'equal or smaller', 1, true) then
      error(added)
    end
    -- The stream is gone (deleted, or evicted apart from its meta) or holds an entry at or
    -- past this offset (someone else wrote the meta's offset or the stream). Messages must not
    -- be lost under a live epoch, nor offsets skipped or reused: the history starts again,
    -- under a new epoch (clients are told recovered: false), with both keys' time to live.
    epoch, offset = new_epoch(meta, stream), 1
    refresh = true
    id = '1-0'
    append(stream, id, kind, payload, tag, false)
  end
  local size = #payload
  local held = 0
  if size > large then
    held = redis.call('HINCRBY', meta, 'bytes', size)
  elseif offset % 64 == 0 then
    held = tonumber(redis.call('HGET', meta, 'bytes')) or 0
  end
  if held > budget or (held > 0 and offset % 64 == 0) then
    -- Oldest first, while over the count or the budget; never this message. Reads at most the
    -- stream's own entries, in batches that grow from 2 (a large publish usually frees one).
    local excess = redis.call('XLEN', stream) - tonumber(maxlen)
    local freed, keep, from = 0, nil, '-'
    local want = math.min(math.max(excess, 2), 128)
    while not keep do
      local batch = redis.call('XRANGE', stream, from, '+', 'COUNT', want)
      if #batch == 0 then
        break
      end
      for i = 1, #batch do
        local e = batch[i]
        if e[1] == id or (excess <= 0 and held - freed <= budget) then
          keep = e[1]
          break
        end
        local f = e[2]
        for j = 1, #f - 1, 2 do
          if f[j] == 'd' and #f[j + 1] > large then
            freed = freed + #f[j + 1]
          end
        end
        excess = excess - 1
      end
      from = '(' .. batch[#batch][1]
      want = math.min(want * 2, 128)
    end
    if keep then
      redis.call('XTRIM', stream, 'MINID', keep)
    end
    if held - freed > budget then
      -- Only the newest is left and the count is still over: it was wrong. Start again from
      -- what the stream holds.
      held, freed = (size > large) and size or 0, 0
    end
    redis.call('HSET', meta, 'bytes', math.max(held - freed, 0))
  elseif offset % 64 == 0 then
    redis.call('XTRIM', stream, 'MAXLEN', '~', maxlen)
  end
  if refresh then
    redis.call('EXPIRE', meta, ttl)
    redis.call('EXPIRE', stream, ttl)
  end
  redis.call(publish, channel, '\0wr1 ' .. kind .. ' ' .. offset .. ' ' .. epoch .. '\n' .. payload)
  return {offset, epoch}
end

local n = math.floor(#KEYS / 2)
local results = {}
for i = 1, n do
  local a = 8 + 5 * (i - 1)
  local ok, r = pcall(one, KEYS[2 * i - 1], KEYS[2 * i], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4], ARGV[a + 5])
  if ok then
    results[i] = r
  elseif type(r) == 'table' and r.err then
    results[i] = r
  elseif type(r) == 'string' and string.match(r, '^[A-Z]+ ') then
    -- Redis's own error (OOM, WRONGTYPE, ...), kept with its code.
    results[i] = {err = r}
  else
    results[i] = {err = 'ERR ' .. tostring(r)}
  end
end
if #KEYS % 2 == 1 and results[n] and not results[n].err then
  -- The last call of a pipelined batch: the publisher's progress marker (one Redis), set to
  -- the last publish's number. Set last, and only when that publish ran in full.
  redis.call('SET', KEYS[#KEYS], string.sub(ARGV[8 + 5 * n], 9), 'EX', 3600)
end
return results
