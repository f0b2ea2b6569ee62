-- Leaves the cluster: drops the alive key (KEYS[1]) and the node record (field ARGV[2]
-- of KEYS[2]), unless another agent's claim (not ARGV[1], when given) holds the node now.
local current = redis.call('GET', KEYS[1])
if ARGV[1] ~= '' and current and current ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('HDEL', KEYS[2], ARGV[2])
return 1
