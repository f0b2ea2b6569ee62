-- A job ends (SUCCEEDED, FAILED, CANCELLED or DEAD), its answer is stored and published,
-- and its message acknowledged: one step.
-- KEYS[1] the job's record, KEYS[2] its QUEUED set, KEYS[3] its RUNNING set, KEYS[4] the
-- set of its new state, KEYS[5] its result key, KEYS[6] kombu's unacked hash, KEYS[7]
-- kombu's unacked index, KEYS[8] its CANCELLED set, KEYS[9] the replica's held set ("" for none).
-- ARGV[1] job id, ARGV[2] new state, ARGV[3] now, ARGV[4] how long the job is kept (s),
-- ARGV[5] the answer (the result record), ARGV[6] the error ("" when none), ARGV[7] the
-- message's delivery tag ("" when not taken from a queue), ARGV[8] the message, kept for
-- a retry ("" for none), ARGV[9] a status message, ARGV[10] the answer of a cancelled
-- job: a job asked to stop while it ran ends CANCELLED (unless DEAD), whatever it returned.
-- Returns the state it ended in.
local ttl = tonumber(ARGV[4])
local state = ARGV[2]
local answer = ARGV[5]
if state ~= 'DEAD' and redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then
  state = 'CANCELLED'
  answer = ARGV[10]
end
local state_set = KEYS[4]
if state == 'CANCELLED' then
  state_set = KEYS[8]
end
redis.call('HSET', KEYS[1], 'state', state, 'finished_at', ARGV[3], 'message', ARGV[9])
if state == 'SUCCEEDED' then
  redis.call('HSET', KEYS[1], 'progress', '1')
end
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[1], 'error', ARGV[6])
end
if ARGV[8] ~= '' then
  redis.call('HSET', KEYS[1], 'call', ARGV[8])
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZADD', state_set, ARGV[3], ARGV[1])
redis.call('EXPIRE', KEYS[1], ttl)
local idempotency = redis.call('HGET', KEYS[1], 'idempotency_record')
if idempotency then
  redis.call('EXPIRE', idempotency, ttl)
end
redis.call('SET', KEYS[5], answer, 'EX', ttl)
redis.call('PUBLISH', KEYS[5], answer)
if ARGV[7] ~= '' then
  redis.call('HDEL', KEYS[6], ARGV[7])
  redis.call('ZREM', KEYS[7], ARGV[7])
  if KEYS[9] ~= '' then
    redis.call('SREM', KEYS[9], ARGV[7])
  end
end
return state
