-- A job waits to run again (an attempt failed with retries left) or for its ETA: QUEUED,
-- its message in the delayed set until ARGV[3], acknowledged from the queue.
-- KEYS[1] the job's record, KEYS[2] its QUEUED set, KEYS[3] its RUNNING set, KEYS[4] the
-- delayed set, KEYS[5] kombu's unacked hash, KEYS[6] kombu's unacked index, KEYS[7] the
-- replica's held set ("" for none), KEYS[8] its result key (the mark of its taking goes:
-- taken again when due, it is not a duplicate).
-- ARGV[1] job id, ARGV[2] now, ARGV[3] when it is due, ARGV[4] the delayed entry (the
-- list and the message), ARGV[5] the error ("" when none), ARGV[6] "1" if an attempt
-- failed, ARGV[7] the delivery tag, ARGV[8] a status message.
-- Returns 1, or 0 (nothing done) for a job asked to stop meanwhile: it is to end CANCELLED.
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then
  return 0
end
redis.call('HSET', KEYS[1], 'state', 'QUEUED', 'message', ARGV[8])
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], 'error', ARGV[5])
end
if ARGV[6] == '1' then
  redis.call('HINCRBY', KEYS[1], 'failures', 1)
end
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[4])
redis.call('HDEL', KEYS[5], ARGV[7])
redis.call('ZREM', KEYS[6], ARGV[7])
if KEYS[7] ~= '' then
  redis.call('SREM', KEYS[7], ARGV[7])
end
redis.call('DEL', KEYS[8])
return 1
