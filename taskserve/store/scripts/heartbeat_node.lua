-- Extends the node's liveness (KEYS[1]) by ARGV[2] milliseconds only while this agent's
-- claim (ARGV[1]) holds it: 1 extended, 0 expired, else the claim of the agent that
-- holds it now.
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not current then
  return 0
end
return current
