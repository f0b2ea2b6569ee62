-- KEYS: lease, replica, its control list, replicas of the deployment, revisions, revision
-- counter[, replicas of the node]; ARGV: fence, replica id, deployment.
--! include bump.lua
--! include fence.lua
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('SREM', KEYS[4], ARGV[2])
if KEYS[7] then
  redis.call('SREM', KEYS[7], ARGV[2])
end
bump(KEYS[5], KEYS[6], ARGV[3])
return 1
