-- Settle one request: the real token count and cost replace the reservation, the slot is freed at
-- every level that holds one, and budget alert thresholds newly crossed are claimed (each once per
-- budget period, across processes).
--
-- KEYS[1..nlev]                  each level's windows hash (the principal's, its team's, its organisation's)
-- KEYS[nlev+1..2*nlev]           each level's concurrency leases
-- KEYS[2*nlev+1..2*nlev+nbud]    budget hashes (s, r), then nbud alert hashes (threshold -> 1), same order
-- ARGV                           the plan's constants first:
--                                  nlev, {holds leases (1/0)} * nlev, ntok, {level, token window field} * ntok,
--                                  nbud, {limit} * nbud, nthr, {permille} * nthr
--                                then this request's values:
--                                  token delta (actual - reserved), {bucket at admission} * ntok,
--                                  lease id ('' = none), budget reserved, actual cost
-- Returns                        {budget index (0-based), threshold permille, spent} * crossings

local nlev = tonumber(ARGV[1])
local ntok = tonumber(ARGV[2 + nlev])
local tok_at = 3 + nlev
local nbud = tonumber(ARGV[tok_at + 2 * ntok])
local limits_at = tok_at + 2 * ntok + 1
local nthr = tonumber(ARGV[limits_at + nbud])
local thr_at = limits_at + nbud + 1
local v = thr_at + nthr
local delta = tonumber(ARGV[v])
local lease, reserved, cost = ARGV[v + 1 + ntok], tonumber(ARGV[v + 2 + ntok]), tonumber(ARGV[v + 3 + ntok])

if delta ~= 0 and ntok > 0 then
  for l = 1, nlev do
    local names, bucket_of = {}, {}
    for w = 1, ntok do
      if tonumber(ARGV[tok_at + 2 * (w - 1)]) == l then
        local field = ARGV[tok_at + 2 * (w - 1) + 1]
        local n = #names
        names[n + 1], names[n + 2], names[n + 3] = field .. ':b', field .. ':c', field .. ':p'
        bucket_of[#bucket_of + 1] = tonumber(ARGV[v + w])
      end
    end
    if #names > 0 then
      local stored = redis.call('HMGET', KEYS[l], unpack(names))
      local writes = {}
      for i = 1, #bucket_of do
        local bucket, b = bucket_of[i], tonumber(stored[3 * i - 2])
        local slot = nil
        if bucket == nil or b == nil then slot = nil elseif b == bucket then slot = 3 * i - 1 elseif b == bucket + 1 then slot = 3 * i end
        if slot then
          local n = (tonumber(stored[slot]) or 0) + delta
          if n < 0 then n = 0 end
          writes[#writes + 1] = names[slot]
          writes[#writes + 1] = n
        end
      end
      if #writes > 0 then redis.call('HSET', KEYS[l], unpack(writes)) end
    end
  end
end

if lease ~= '' then
  for l = 1, nlev do
    if ARGV[1 + l] == '1' then redis.call('ZREM', KEYS[nlev + l], lease) end
  end
end

local out = {}
local bkey0 = 2 * nlev
for k = 1, nbud do
  local key, alerts, limit = KEYS[bkey0 + k], KEYS[bkey0 + nbud + k], tonumber(ARGV[limits_at + k - 1])
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
