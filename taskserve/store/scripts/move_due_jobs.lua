-- Moves the messages of the delayed set (KEYS[1]) that are due (score <= ARGV[1]) onto
-- their lists, at most ARGV[2] of them. Each entry is "<list>\n<message>". Returns how
-- many moved and the earliest due time left ("" when none).
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, entry in ipairs(due) do
  local newline = string.find(entry, '\n', 1, true)
  if newline then
    redis.call('LPUSH', string.sub(entry, 1, newline - 1), string.sub(entry, newline + 1))
  end
  redis.call('ZREM', KEYS[1], entry)
end
local next_due = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {#due, next_due[2] or ''}
