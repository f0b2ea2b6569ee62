-- Writes fields to a replica hash only if the replica still exists, so a late state
-- report cannot resurrect a record the controller already forgot.
-- KEYS: lease, replica, revisions, revision counter; ARGV: fence, field, value, ...
--! include bump.lua
--! include fence.lua
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('HSET', KEYS[2], unpack(ARGV, 2))
  bump(KEYS[3], KEYS[4], redis.call('HGET', KEYS[2], 'deployment'))
  return 1
end
return 0
