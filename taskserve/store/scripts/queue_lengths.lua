-- KEYS: queues; the length of each, in one command (cheaper to send and parse than a
-- pipeline of LLENs, for the controller's frequent looks between passes).
local lengths = {}
for i, key in ipairs(KEYS) do
  lengths[i] = redis.call('LLEN', key)
end
return lengths
