-- KEYS: lease; ARGV: token, TTL in milliseconds. 1 if the lease still held the token.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
