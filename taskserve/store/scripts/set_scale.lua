-- KEYS: lease, goal, scale, history; ARGV: fence, state JSON, history entry JSON ('' for
-- none), history limit, limit of autoscaling entries, the prefix of their JSON. Written
-- only while the deployment exists. An entry beyond the autoscaling limit replaces the
-- oldest autoscaling entry, not a goal change.
--! include fence.lua
if redis.call('EXISTS', KEYS[2]) == 0 then
  return 0
end
redis.call('SET', KEYS[3], ARGV[2])
if ARGV[3] ~= '' then
  local prefix = ARGV[6]
  local oldest = nil
  local count = 0
  for _, item in ipairs(redis.call('LRANGE', KEYS[4], 0, -1)) do
    if string.sub(item, 1, string.len(prefix)) == prefix then
      count = count + 1
      if oldest == nil then
        oldest = item
      end
    end
  end
  if oldest ~= nil and count >= tonumber(ARGV[5]) then
    redis.call('LREM', KEYS[4], 1, oldest)
  end
  redis.call('RPUSH', KEYS[4], ARGV[3])
  redis.call('LTRIM', KEYS[4], -tonumber(ARGV[4]), -1)
end
return 1
