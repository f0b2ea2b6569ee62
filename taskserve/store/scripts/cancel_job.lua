-- Cancels a job: a QUEUED one ends CANCELLED at once (a replica that takes its message
-- later does not run it); a RUNNING one is asked to stop (its cancel flag is set).
-- KEYS[1] the job's record, KEYS[2] its QUEUED set, KEYS[3] its CANCELLED set, KEYS[4]
-- its result key, KEYS[5] its cancel flag.
-- ARGV[1] job id, ARGV[2] now, ARGV[3] how long the job is kept (s), ARGV[4] the answer
-- of a cancelled job, ARGV[5] how long the flag is kept (s).
-- Returns the job's state after: 'CANCELLED', 'RUNNING' (asked), a finished state
-- (nothing changed), or 'GONE'.
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  return 'GONE'
end
if state == 'QUEUED' then
  local ttl = tonumber(ARGV[3])
  redis.call('HSET', KEYS[1], 'state', 'CANCELLED', 'finished_at', ARGV[2], 'message', 'cancelled while queued')
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
  redis.call('EXPIRE', KEYS[1], ttl)
  local idempotency = redis.call('HGET', KEYS[1], 'idempotency_record')
  if idempotency then
    redis.call('EXPIRE', idempotency, ttl)
  end
  redis.call('SET', KEYS[4], ARGV[4], 'EX', ttl)
  redis.call('PUBLISH', KEYS[4], ARGV[4])
  return 'CANCELLED'
end
if state == 'RUNNING' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
  redis.call('SET', KEYS[5], '1', 'EX', tonumber(ARGV[5]))
  return 'RUNNING'
end
return state
