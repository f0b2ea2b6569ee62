-- A node's alive key (KEYS[1]) holds its agent's claim. An agent takes it only if
-- nobody holds it, if it holds it already, or if it holds ARGV[4] (a stale claim the
-- agent proved dead), and then writes the node record (KEYS[2], field ARGV[3],
-- value ARGV[5]). ARGV[2] is the TTL in milliseconds. Returns ARGV[1] (the claim) when
-- taken, else the holder's claim.
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] and current ~= ARGV[4] then
  return current
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('HSET', KEYS[2], ARGV[3], ARGV[5])
return ARGV[1]
