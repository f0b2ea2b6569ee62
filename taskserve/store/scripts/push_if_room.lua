-- Pushes a request (ARGV[1]) onto KEYS[1] unless the queue's lists (KEYS[2], KEYS[3] ...:
-- every priority of the queue) hold ARGV[2] requests already. Returns the queue's new
-- length, or minus its length when it was full (a full queue is never empty).
local queued = 0
for i = 2, #KEYS do
  queued = queued + redis.call('LLEN', KEYS[i])
end
if queued >= tonumber(ARGV[2]) then
  return -queued
end
redis.call('LPUSH', KEYS[1], ARGV[1])
return queued + 1
