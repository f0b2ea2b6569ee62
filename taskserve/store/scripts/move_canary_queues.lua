-- Moves every request of the canary queue (KEYS[1]) to the deployment's queue (KEYS[2]),
-- oldest first to the end served next, with the routing key their message carries
-- (ARGV[1], the canary queue's name) changed to the deployment's queue (ARGV[2]), so a
-- replica that dies holding one gives it back there. Returns how many were moved.
-- With many pairs (KEYS and ARGV: canary queue, queue, canary queue, ...), each pair in
-- turn, in one call; returns the counts in that order.
local counts = {}
for pair = 1, #KEYS, 2 do
  local from_key = '"routing_key": "' .. ARGV[pair] .. '"'
  local to_key = '"routing_key": "' .. ARGV[pair + 1] .. '"'
  local moved = 0
  while true do
    local item = redis.call('LPOP', KEYS[pair])
    if not item then
      break
    end
    local at = string.find(item, from_key, 1, true)
    if at then
      item = string.sub(item, 1, at - 1) .. to_key .. string.sub(item, at + string.len(from_key))
    end
    redis.call('RPUSH', KEYS[pair + 1], item)
    moved = moved + 1
  end
  counts[#counts + 1] = moved
end
return counts
