-- KEYS: lease, replica, replicas of the deployment, revisions, revision counter[, replicas
-- of the node]; ARGV: fence, replica id, deployment, field, value, ...
--! include bump.lua
--! include fence.lua
redis.call('HSET', KEYS[2], unpack(ARGV, 4))
redis.call('SADD', KEYS[3], ARGV[2])
if KEYS[6] then
  redis.call('SADD', KEYS[6], ARGV[2])
end
bump(KEYS[4], KEYS[5], ARGV[3])
return 1
