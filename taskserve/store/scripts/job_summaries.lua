-- Every deployment's jobs at a glance, in one command (cheaper to send and parse than a
-- pipeline of ZCARDs, for the gateway's status read of every deployment).
-- KEYS: per deployment, its six state sets (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED,
-- DEAD) and its stats hash. ARGV[1] the stats field counting the job attempts started.
-- Returns, per deployment, eight values: the six sets' sizes, when its oldest QUEUED job
-- was queued ("" when none waits) and the attempts started (0 when none).
local summaries = {}
for first = 1, #KEYS, 7 do
  for i = 0, 5 do
    summaries[#summaries + 1] = redis.call('ZCARD', KEYS[first + i])
  end
  local oldest = redis.call('ZRANGE', KEYS[first], 0, 0, 'WITHSCORES')
  summaries[#summaries + 1] = oldest[2] or ''
  summaries[#summaries + 1] = tonumber(redis.call('HGET', KEYS[first + 6], ARGV[1]) or '0') or 0
end
return summaries
