-- Settle one request: the real token count and cost replace the reservation, the slot is freed,
-- and budget alert thresholds newly crossed are claimed (each once per budget period, across processes).
--
-- KEYS[1]              the principal's windows hash
-- KEYS[2]              the principal's concurrency leases
-- KEYS[3..2+nbud]      budget hashes (s, r), then nbud alert hashes (threshold -> 1), same order
-- ARGV                 ntok, {field, bucket, delta} * ntok, lease id ('' = none),
--                      nbud, {reserved, cost, limit} * nbud, nthr, {threshold permille} * nthr
-- Returns              {budget index (0-based), threshold permille, spent} * crossings

local ntok = tonumber(ARGV[1])
local a = 2
for w = 1, ntok do
  local field, bucket, delta = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  a = a + 3
  local b = tonumber(redis.call('HGET', KEYS[1], field .. ':b'))
  local slot = nil
  if b == bucket then slot = field .. ':c' elseif b == bucket + 1 then slot = field .. ':p' end
  if slot then
    local n = (tonumber(redis.call('HGET', KEYS[1], slot)) or 0) + delta
    if n < 0 then n = 0 end
    redis.call('HSET', KEYS[1], slot, n)
  end
end

local lease = ARGV[a]
a = a + 1
if lease ~= '' then redis.call('ZREM', KEYS[2], lease) end

local nbud = tonumber(ARGV[a])
a = a + 1
local budgets = {}
for k = 1, nbud do
  budgets[k] = {tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])}
  a = a + 3
end
local nthr = tonumber(ARGV[a])
a = a + 1
local out = {}
for k = 1, nbud do
  local key, alerts = KEYS[2 + k], KEYS[2 + nbud + k]
  local reserved, cost, limit = budgets[k][1], budgets[k][2], budgets[k][3]
  local r = (tonumber(redis.call('HGET', key, 'r')) or 0) - reserved
  if r < 0 then r = 0 end
  redis.call('HSET', key, 'r', r)
  local spent = redis.call('HINCRBY', key, 's', cost)
  for t = 1, nthr do
    local permille = tonumber(ARGV[a + t - 1])
    if spent * 1000 >= permille * limit and redis.call('HSETNX', alerts, permille, 1) == 1 then
      local ttl = redis.call('TTL', key)
      if ttl > 0 then redis.call('EXPIRE', alerts, ttl) end
      out[#out + 1] = k - 1
      out[#out + 1] = permille
      out[#out + 1] = spent
    end
  end
end
return out
