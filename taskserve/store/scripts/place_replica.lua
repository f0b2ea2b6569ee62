-- KEYS: lease, replica, replicas of the node, revisions, revision counter; ARGV: fence,
-- replica id, node id, gpu ids. A replica forgotten meanwhile is not placed (no half
-- record is written).
--! include bump.lua
--! include fence.lua
if redis.call('EXISTS', KEYS[2]) == 0 then
  return 0
end
redis.call('HSET', KEYS[2], 'node_id', ARGV[3], 'gpu_ids', ARGV[4], 'message', '')
redis.call('SADD', KEYS[3], ARGV[2])
bump(KEYS[4], KEYS[5], redis.call('HGET', KEYS[2], 'deployment'))
return 1
