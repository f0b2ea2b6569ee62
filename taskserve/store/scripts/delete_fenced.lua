-- KEYS: lease, keys to delete; ARGV: fence. The number deleted.
--! include fence.lua
if #KEYS < 2 then
  return 0
end
return redis.call('DEL', unpack(KEYS, 2))
