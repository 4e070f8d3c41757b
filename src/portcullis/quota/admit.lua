-- Admit one request against every limit of one principal: check them all, then take them all, or
-- take nothing. The same algorithm as quota/window.py and MemoryQuotaStore.admit_now.
--
-- It also applies the settlements of this principal's earlier requests that the caller carried
-- along (token corrections, freed concurrency slots): one round trip does both, and the corrections
-- land before the check, so the check sees them.
--
-- KEYS[1]        the principal's windows: a hash with <field>:b, <field>:c, <field>:p per window
-- KEYS[2]        the principal's concurrency leases: a sorted set, lease id -> expiry time
-- KEYS[3..]      one hash per budget and period: s (spent), r (reserved), in micro-units
-- ARGV           the plan's constants first (the caller encodes them once per plan):
--                  windows ttl, nwin, {field, seconds, limit} * nwin, concurrency limit (0: none),
--                  lease seconds, nbud, {limit} * nbud,
--                then this request's values:
--                  now ('' = Redis TIME), tokens, cost, lease id, {seconds to period end} * nbud,
--                  admit (1, or 0: only apply the carried settlements), ncarry,
--                  {token delta, {bucket} * (token windows), lease id or ''} * ncarry
--                A window whose field starts with 't' counts tokens, any other counts requests.
-- Returns        {failed, index, retry_ms, {bucket, remaining, reset_ms} * nwin}
--                failed: 0 admitted, 1 window, 2 concurrency, 3 budget, 4 larger than the limit

local ttl = tonumber(ARGV[1])
local nwin = tonumber(ARGV[2])
local a = 3 + 3 * nwin
local conc_limit, lease_s, nbud = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
local limits_at = a + 3
local v_at = limits_at + nbud
local now
if ARGV[v_at] ~= '' then
  now = tonumber(ARGV[v_at])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local tokens, req_cost, lease = tonumber(ARGV[v_at + 1]), tonumber(ARGV[v_at + 2]), ARGV[v_at + 3]
local ends_at = v_at + 4
local admit = ARGV[ends_at + nbud] == '1'
local ncarry = tonumber(ARGV[ends_at + nbud + 1])
local carry_at = ends_at + nbud + 2
local failed, index, retry = 0, 0, 0
local NEVER = 1e18

local function refuse(kind, i, wait)
  if failed == 0 or wait > retry then
    failed, index, retry = kind, i, wait
  end
end

-- One read for every window: {<field>:b, <field>:c, <field>:p} per window.
local names, is_tokens, ntok = {}, {}, 0
for w = 1, nwin do
  local field = ARGV[3 * w]
  names[3 * w - 2], names[3 * w - 1], names[3 * w] = field .. ':b', field .. ':c', field .. ':p'
  is_tokens[w] = string.byte(field, 1) == 116
  if is_tokens[w] then ntok = ntok + 1 end
end
local stored = {}
if nwin > 0 then stored = redis.call('HMGET', KEYS[1], unpack(names)) end

-- Carried settlements: correct the bucket each reservation was taken from (if it still counts).
local dirty = false
local prev_fixed = {}
local freed = {}
for j = 1, ncarry do
  local base = carry_at + (j - 1) * (ntok + 2)
  local delta = tonumber(ARGV[base])
  if delta ~= 0 then
    local t = 0
    for w = 1, nwin do
      if is_tokens[w] then
        t = t + 1
        local bucket, b = tonumber(ARGV[base + t]), tonumber(stored[3 * w - 2])
        local slot = nil
        if b == bucket then slot = 3 * w - 1 elseif b == bucket + 1 then slot = 3 * w end
        if slot then
          local n = (tonumber(stored[slot]) or 0) + delta
          if n < 0 then n = 0 end
          stored[slot] = n
          dirty = true
          if slot == 3 * w then prev_fixed[w] = true end
        end
      end
    end
  end
  local done = ARGV[base + ntok + 1]
  if done ~= '' then freed[#freed + 1] = done end
end
if #freed > 0 then redis.call('ZREM', KEYS[2], unpack(freed)) end

local states = {}
local rolled = false
for w = 1, nwin do
  local seconds, limit = tonumber(ARGV[3 * w + 1]), tonumber(ARGV[3 * w + 2])
  local cost = 1
  if is_tokens[w] then cost = tokens end
  local idx = math.floor(now / seconds)
  local b = tonumber(stored[3 * w - 2])
  if b == nil then b = idx; rolled = true end
  local c, p = tonumber(stored[3 * w - 1]) or 0, tonumber(stored[3 * w]) or 0
  if idx < b then idx = b end
  if idx == b + 1 then p = c; c = 0 elseif idx ~= b then p = 0; c = 0 end
  if idx ~= b then rolled = true end
  local frac = (now - idx * seconds) / seconds
  if frac < 0 then frac = 0 end
  local est = p * (1 - frac) + c
  if admit then
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
  end
  states[w] = {seconds, limit, cost, idx, c, p, frac}
end
if not admit then
  if dirty then
    local writes = {}
    for w = 1, nwin do
      local s = states[w]
      local n = #writes
      writes[n + 1], writes[n + 2], writes[n + 3] = names[3 * w - 2], s[4], names[3 * w - 1]
      writes[n + 4], writes[n + 5], writes[n + 6] = s[5], names[3 * w], s[6]
    end
    redis.call('HSET', KEYS[1], unpack(writes))
  end
  return {}
end

local held = 0
if conc_limit > 0 then
  held = redis.call('ZCARD', KEYS[2])
  if held >= conc_limit then
    -- Full: drop leases whose holders died without releasing them (expired), then count again.
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
    held = redis.call('ZCARD', KEYS[2])
    if held >= conc_limit then
      refuse(2, 0, math.max(retry, 1))
    end
  end
end

for k = 1, nbud do
  local limit, ends = tonumber(ARGV[limits_at + k - 1]), tonumber(ARGV[ends_at + k - 1])
  local v = redis.call('HMGET', KEYS[2 + k], 's', 'r')
  if (tonumber(v[1]) or 0) + (tonumber(v[2]) or 0) + req_cost > limit then
    refuse(3, k - 1, ends)
  end
end

local out = {failed, index, math.ceil(retry * 1000)}
local writes = {}
for w = 1, nwin do
  local s = states[w]
  local seconds, limit, cost, idx, c, p, frac = s[1], s[2], s[3], s[4], s[5], s[6], s[7]
  if failed == 0 then c = c + cost end
  -- Within a bucket only the count changes; the bucket index and the previous count only when it
  -- rolls (or a carried settlement corrected the previous count).
  local n = #writes
  writes[n + 1], writes[n + 2] = names[3 * w - 1], c
  if idx ~= tonumber(stored[3 * w - 2]) or prev_fixed[w] then
    writes[n + 3], writes[n + 4], writes[n + 5], writes[n + 6] = names[3 * w - 2], idx, names[3 * w], p
  end
  local remaining = math.floor(limit - (p * (1 - frac) + c))
  if remaining < 0 then remaining = 0 end
  local reset = 0
  if c > 0 then reset = (1 - frac) * seconds + seconds elseif p > 0 then reset = (1 - frac) * seconds end
  out[#out + 1] = idx
  out[#out + 1] = remaining
  out[#out + 1] = math.ceil(reset * 1000)
end

if nwin > 0 and (failed == 0 or dirty) then
  redis.call('HSET', KEYS[1], unpack(writes))
  -- The hash outlives its longest window twice over; refreshed whenever a bucket rolls over.
  if rolled then redis.call('EXPIRE', KEYS[1], ttl) end
end
if failed == 0 then
  if conc_limit > 0 then
    redis.call('ZADD', KEYS[2], now + lease_s, lease)
    -- Kept alive while leases are held by the renewal of live leases (RedisQuotaStore.renew).
    if held == 0 then redis.call('EXPIRE', KEYS[2], math.ceil(lease_s * 2)) end
  end
  for k = 1, nbud do
    redis.call('HINCRBY', KEYS[2 + k], 'r', req_cost)
    redis.call('EXPIRE', KEYS[2 + k], math.ceil(tonumber(ARGV[ends_at + k - 1])) + 86400)
  end
end
return out
