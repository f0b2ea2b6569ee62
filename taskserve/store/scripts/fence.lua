-- The fence of the controller's writes (included at the top of each fenced script).
-- With a fence (ARGV[1], the lease token the controller got) the write happens only
-- while the lease (KEYS[1]) still holds that token, so a controller that was paused
-- past its lease writes nothing once it wakes up; -1 says the lease is lost. Without a
-- fence (ARGV[1] == '': agents, replicas, clients) the check passes.
if ARGV[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return -1
end
