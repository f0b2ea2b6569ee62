-- Submits jobs: for each, its record, its place among the QUEUED jobs and its message on
-- the queue; every job of the call or none (nothing half-written if Redis fails under it).
-- The jobs of one call share their record's fields (one handle's options, one moment):
-- the fields travel once, each job adds only its id and its message.
-- KEYS[1] the deployment's QUEUED set, KEYS[2] the list to push onto, KEYS[3] the
-- idempotency key ("" when none; then one job only), KEYS[4..3+Q] every list of the queue
-- (counted against max_queued), then the record of each job, in the order of ARGV.
-- ARGV[1] now, ARGV[2] max_queued (0: no limit), ARGV[3] Q, ARGV[4] F, ARGV[5..4+F] the
-- records' fields and values, then for each job its id and its message.
-- Returns {1, first job id} when submitted, {0, id} for the job already submitted under
-- the idempotency key (or these very jobs: a call sent again after its reply was lost
-- queues nothing twice, all or none having been written), {-1, queued} when the queue
-- holds max_queued requests or would with these (none is submitted).
local lists = tonumber(ARGV[3])
local field_args = tonumber(ARGV[4])
local first_job = 5 + field_args
local jobs = (#ARGV - first_job + 1) / 2
if redis.call('EXISTS', KEYS[4 + lists]) == 1 then
  return {0, ARGV[first_job]}
end
if KEYS[3] ~= '' then
  local existing = redis.call('GET', KEYS[3])
  if existing then
    return {0, existing}
  end
end
local max_queued = tonumber(ARGV[2])
if max_queued > 0 then
  local queued = 0
  for i = 4, 3 + lists do
    queued = queued + redis.call('LLEN', KEYS[i])
  end
  if queued + jobs > max_queued then
    return {-1, queued}
  end
end
local fields = {}
for i = 5, 4 + field_args do
  fields[#fields + 1] = ARGV[i]
end
local scored = {}
local messages = {}
for j = 0, jobs - 1 do
  local id = ARGV[first_job + 2 * j]
  redis.call('HSET', KEYS[4 + lists + j], unpack(fields))
  scored[#scored + 1] = ARGV[1]
  scored[#scored + 1] = id
  messages[#messages + 1] = ARGV[first_job + 2 * j + 1]
end
if KEYS[3] ~= '' then
  redis.call('HSET', KEYS[4 + lists], 'idempotency_record', KEYS[3])
  redis.call('SET', KEYS[3], ARGV[first_job])
end
-- In slices: unpack() of a whole batch could pass Lua's limit on a call's arguments.
for i = 1, #scored, 1000 do
  redis.call('ZADD', KEYS[1], unpack(scored, i, math.min(i + 999, #scored)))
end
for i = 1, #messages, 1000 do
  redis.call('LPUSH', KEYS[2], unpack(messages, i, math.min(i + 999, #messages)))
end
return {1, ARGV[first_job]}
