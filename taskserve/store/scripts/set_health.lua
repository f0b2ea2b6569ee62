-- KEYS: lease, goal, health, revisions, revision counter; ARGV: fence, health JSON,
-- deployment. Written only while the deployment exists, and only when it changed (1 if
-- written).
--! include bump.lua
--! include fence.lua
if redis.call('EXISTS', KEYS[2]) == 0 or redis.call('GET', KEYS[3]) == ARGV[2] then
  return 0
end
redis.call('SET', KEYS[3], ARGV[2])
bump(KEYS[4], KEYS[5], ARGV[3])
return 1
