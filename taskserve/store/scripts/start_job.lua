-- A replica takes a job: RUNNING, one attempt more, unless it is not to run.
-- KEYS[1] the job's record, KEYS[2] its deployment's QUEUED set, KEYS[3] its RUNNING set.
-- ARGV[1] job id, ARGV[2] replica id, ARGV[3] now, ARGV[4] "1" to make the record of a
-- job a plain Celery producer sent (it has none), ARGV[5..] that record's fields.
-- Returns {state before, attempts, failures, max_retries, retry_delay_s}; a state of
-- 'GONE' (no record: expired or purged) or a finished one means: do not run it.
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  if ARGV[4] ~= '1' then
    return {'GONE', 0, 0, 0, ''}
  end
  local fields = {}
  for i = 5, #ARGV do
    fields[#fields + 1] = ARGV[i]
  end
  redis.call('HSET', KEYS[1], unpack(fields))
  state = 'QUEUED'
end
if state ~= 'QUEUED' and state ~= 'RUNNING' then
  return {state, 0, 0, 0, ''}
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'state', 'RUNNING', 'started_at', ARGV[3], 'replica', ARGV[2])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
local values = redis.call('HMGET', KEYS[1], 'failures', 'max_retries', 'retry_delay_s')
return {state, attempts, tonumber(values[1] or '0') or 0, tonumber(values[2] or '0') or 0, values[3] or ''}
