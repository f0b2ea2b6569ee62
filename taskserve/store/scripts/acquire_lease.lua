-- The lease's value is "<epoch>:<holder>"; the epoch (KEYS[2]) grows with every new
-- leadership, so the value is a token that no earlier leadership shares. The holder
-- (ARGV[1]) renews its own lease; anyone takes a lease nobody holds.
-- KEYS: lease, epoch; ARGV: holder, TTL in milliseconds. The token, or false.
local current = redis.call('GET', KEYS[1])
if current then
  local sep = string.find(current, ':', 1, true)
  if sep and string.sub(current, sep + 1) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return current
  end
  return false
end
local token = redis.call('INCR', KEYS[2]) .. ':' .. ARGV[1]
redis.call('SET', KEYS[1], token, 'PX', ARGV[2])
return token
