-- Submits a job: its record, its place among the QUEUED jobs and its message on the queue,
-- in one step (nothing half-written if Redis fails under it).
-- KEYS[1] the job's record, KEYS[2] the deployment's QUEUED set, KEYS[3] the list to push
-- onto, KEYS[4] the idempotency key ("" when none), KEYS[5..] every list of the queue
-- (counted against max_queued).
-- ARGV[1] job id, ARGV[2] the message, ARGV[3] now, ARGV[4] max_queued (0: no limit),
-- ARGV[5..] the record's fields and values.
-- Returns {1, id} when submitted, {0, id} for the job already submitted under the
-- idempotency key, {-1, queued} when the queue is full.
if KEYS[4] ~= '' then
  local existing = redis.call('GET', KEYS[4])
  if existing then
    return {0, existing}
  end
end
local max_queued = tonumber(ARGV[4])
if max_queued > 0 then
  local queued = 0
  for i = 5, #KEYS do
    queued = queued + redis.call('LLEN', KEYS[i])
  end
  if queued >= max_queued then
    return {-1, queued}
  end
end
local fields = {}
for i = 5, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
redis.call('HSET', KEYS[1], unpack(fields))
if KEYS[4] ~= '' then
  redis.call('HSET', KEYS[1], 'idempotency_record', KEYS[4])
  redis.call('SET', KEYS[4], ARGV[1])
end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
redis.call('LPUSH', KEYS[3], ARGV[2])
return {1, ARGV[1]}
