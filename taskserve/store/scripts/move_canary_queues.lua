-- Moves every request of a canary queue's list (KEYS[1]) to the deployment's queue's list
-- of the same priority (KEYS[2]), oldest first to the end served next, with the routing
-- key their message carries (ARGV[1], the canary queue's name) changed to the deployment's
-- queue (ARGV[2]), so a replica that dies holding one gives it back there. Returns how
-- many were moved. With many pairs (KEYS and ARGV: canary list, list, canary list, ...;
-- canary queue, queue, ...), each pair in turn, in one call; returns the counts in that order.
-- The routing key is written with or without a space after the colon (kombu's JSON has
-- one, taskserve's compact JSON none).
local function rerouted(item, from_queue, to_queue)
  for _, colon in ipairs({'": "', '":"'}) do
    local from_key = '"routing_key' .. colon .. from_queue .. '"'
    local at = string.find(item, from_key, 1, true)
    if at then
      return string.sub(item, 1, at - 1) .. '"routing_key' .. colon .. to_queue .. '"'
        .. string.sub(item, at + string.len(from_key))
    end
  end
  return item
end

local counts = {}
for pair = 1, #KEYS, 2 do
  local moved = 0
  while true do
    local item = redis.call('LPOP', KEYS[pair])
    if not item then
      break
    end
    item = rerouted(item, ARGV[pair], ARGV[pair + 1])
    redis.call('RPUSH', KEYS[pair + 1], item)
    moved = moved + 1
  end
  counts[#counts + 1] = moved
end
return counts
