-- Admit one request against every limit of one principal: check them all, then take them all, or
-- take nothing. The same algorithm as quota/window.py and MemoryQuotaStore.admit_now.
--
-- KEYS[1]        the principal's windows: a hash with <field>:b, <field>:c, <field>:p per window
-- KEYS[2]        the principal's concurrency leases: a sorted set, lease id -> expiry time
-- KEYS[3..]      one hash per budget and period: s (spent), r (reserved), in micro-units
-- ARGV           now ('' = Redis TIME), windows ttl, nwin, {field, seconds, limit, cost} * nwin,
--                concurrency limit (0: none), lease id, lease seconds,
--                nbud, {limit, cost, seconds to period end} * nbud
-- Returns        {failed, index, retry_ms, {bucket, remaining, reset_ms} * nwin}
--                failed: 0 admitted, 1 window, 2 concurrency, 3 budget, 4 larger than the limit

local now
if ARGV[1] ~= '' then
  now = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local ttl = tonumber(ARGV[2])
local nwin = tonumber(ARGV[3])
local failed, index, retry = 0, 0, 0
local NEVER = 1e18
local states = {}
local a = 4

local function refuse(kind, i, wait)
  if failed == 0 or wait > retry then
    failed, index, retry = kind, i, wait
  end
end

for w = 1, nwin do
  local field, seconds, limit, cost = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  a = a + 4
  local v = redis.call('HMGET', KEYS[1], field .. ':b', field .. ':c', field .. ':p')
  local idx = math.floor(now / seconds)
  local b, c, p = tonumber(v[1]) or idx, tonumber(v[2]) or 0, tonumber(v[3]) or 0
  if idx < b then idx = b end
  if idx == b + 1 then p = c; c = 0 elseif idx ~= b then p = 0; c = 0 end
  local frac = (now - idx * seconds) / seconds
  if frac < 0 then frac = 0 end
  local est = p * (1 - frac) + c
  if cost > limit then
    refuse(4, w - 1, NEVER)
  elseif est + cost > limit then
    local wait
    if c + cost <= limit then
      wait = (1 - (limit - c - cost) / p - frac) * seconds
      if wait < 0 then wait = 0 end
    else
      wait = (1 - frac) * seconds + (1 - (limit - cost) / c) * seconds
    end
    refuse(1, w - 1, wait)
  end
  states[w] = {field, seconds, limit, cost, idx, c, p, frac}
end

local conc_limit, lease, lease_s = tonumber(ARGV[a]), ARGV[a + 1], tonumber(ARGV[a + 2])
a = a + 3
if conc_limit > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= conc_limit then
    refuse(2, 0, math.max(retry, 1))
  end
end

local nbud = tonumber(ARGV[a])
a = a + 1
local budgets = {}
for k = 1, nbud do
  local limit, cost, ends = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  a = a + 3
  local v = redis.call('HMGET', KEYS[2 + k], 's', 'r')
  if (tonumber(v[1]) or 0) + (tonumber(v[2]) or 0) + cost > limit then
    refuse(3, k - 1, ends)
  end
  budgets[k] = {cost, ends}
end

local out = {failed, index, math.ceil(retry * 1000)}
for w = 1, nwin do
  local s = states[w]
  local field, seconds, limit, cost, idx, c, p, frac = s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8]
  if failed == 0 then
    c = c + cost
    redis.call('HSET', KEYS[1], field .. ':b', idx, field .. ':c', c, field .. ':p', p)
  end
  local remaining = math.floor(limit - (p * (1 - frac) + c))
  if remaining < 0 then remaining = 0 end
  local reset = 0
  if c > 0 then reset = (1 - frac) * seconds + seconds elseif p > 0 then reset = (1 - frac) * seconds end
  out[#out + 1] = idx
  out[#out + 1] = remaining
  out[#out + 1] = math.ceil(reset * 1000)
end

if failed == 0 then
  if nwin > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
  if conc_limit > 0 then
    redis.call('ZADD', KEYS[2], now + lease_s, lease)
    redis.call('EXPIRE', KEYS[2], math.ceil(lease_s * 2))
  end
  for k = 1, nbud do
    redis.call('HINCRBY', KEYS[2 + k], 'r', budgets[k][1])
    redis.call('EXPIRE', KEYS[2 + k], math.ceil(budgets[k][2]) + 86400)
  end
end
return out
