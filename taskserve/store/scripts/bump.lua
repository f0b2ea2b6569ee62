-- Every write to a deployment's goal, health, replica set or replica records gives the
-- deployment a new revision: the next value of a counter shared by all deployments, so a
-- deployment deleted and made again never repeats one. A reader that remembers the
-- revisions re-reads only the deployments whose revision moved (see ClusterReader).
-- bump(revisions, counter, name) does it inside a script; a false name does nothing.
local function bump(revisions, counter, name)
  if name then
    redis.call('HSET', revisions, name, redis.call('INCR', counter))
  end
end
