-- Settle one request: the real token count and cost replace the reservation, the slot is freed,
-- and budget alert thresholds newly crossed are claimed (each once per budget period, across processes).
--
-- KEYS[1]              the principal's windows hash
-- KEYS[2]              the principal's concurrency leases
-- KEYS[3..2+nbud]      budget hashes (s, r), then nbud alert hashes (threshold -> 1), same order
-- ARGV                 the plan's constants first:
--                        ntok, {token window field} * ntok, nbud, {limit} * nbud, nthr, {permille} * nthr
--                      then this request's values:
--                        token delta (actual - reserved), {bucket at admission} * ntok,
--                        lease id ('' = none), budget reserved, actual cost
-- Returns              {budget index (0-based), threshold permille, spent} * crossings

local ntok = tonumber(ARGV[1])
local nbud = tonumber(ARGV[2 + ntok])
local limits_at = 3 + ntok
local nthr = tonumber(ARGV[limits_at + nbud])
local thr_at = limits_at + nbud + 1
local v = thr_at + nthr
local delta = tonumber(ARGV[v])
local lease, reserved, cost = ARGV[v + 1 + ntok], tonumber(ARGV[v + 2 + ntok]), tonumber(ARGV[v + 3 + ntok])

if delta ~= 0 and ntok > 0 then
  local names = {}
  for w = 1, ntok do
    local field = ARGV[1 + w]
    names[3 * w - 2], names[3 * w - 1], names[3 * w] = field .. ':b', field .. ':c', field .. ':p'
  end
  local stored = redis.call('HMGET', KEYS[1], unpack(names))
  local writes = {}
  for w = 1, ntok do
    local bucket, b = tonumber(ARGV[v + w]), tonumber(stored[3 * w - 2])
    local slot = nil
    if b == bucket then slot = 3 * w - 1 elseif b == bucket + 1 then slot = 3 * w end
    if slot then
      local n = (tonumber(stored[slot]) or 0) + delta
      if n < 0 then n = 0 end
      writes[#writes + 1] = names[slot]
      writes[#writes + 1] = n
    end
  end
  if #writes > 0 then redis.call('HSET', KEYS[1], unpack(writes)) end
end

if lease ~= '' then redis.call('ZREM', KEYS[2], lease) end

local out = {}
for k = 1, nbud do
  local key, alerts, limit = KEYS[2 + k], KEYS[2 + nbud + k], tonumber(ARGV[limits_at + k - 1])
  local r = (tonumber(redis.call('HGET', key, 'r')) or 0) - reserved
  if r < 0 then r = 0 end
  redis.call('HSET', key, 'r', r)
  local spent = redis.call('HINCRBY', key, 's', cost)
  for t = 1, nthr do
    local permille = tonumber(ARGV[thr_at + t - 1])
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
