-- KEYS: lease; ARGV: the holder, or its token. Deletes the lease only if they hold it.
local current = redis.call('GET', KEYS[1])
if not current then
  return 0
end
local sep = string.find(current, ':', 1, true)
if current == ARGV[1] or (sep and string.sub(current, sep + 1) == ARGV[1]) then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
