-- Queues a FAILED or DEAD job again: a new attempt under the same id, with its retries
-- counted afresh.
-- KEYS[1] the job's record, KEYS[2] the set of its state now, KEYS[3] its QUEUED set,
-- KEYS[4] the list to push onto, KEYS[5] its result key.
-- ARGV[1] job id, ARGV[2] now, ARGV[3] the state it must be in, ARGV[4] a status message.
-- Returns 1, or the state it was in when that is not ARGV[3] ('GONE' without a record,
-- 'NOCALL' without a message to run).
local values = redis.call('HMGET', KEYS[1], 'state', 'call')
if not values[1] then
  return 'GONE'
end
if values[1] ~= ARGV[3] then
  return values[1]
end
if not values[2] then
  return 'NOCALL'
end
redis.call('HSET', KEYS[1], 'state', 'QUEUED', 'failures', '0', 'message', ARGV[4])
redis.call('HDEL', KEYS[1], 'finished_at', 'call', 'cancel_requested')
redis.call('PERSIST', KEYS[1])
local idempotency = redis.call('HGET', KEYS[1], 'idempotency_record')
if idempotency then
  redis.call('PERSIST', idempotency)
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('DEL', KEYS[5])
redis.call('LPUSH', KEYS[4], values[2])
return 1
