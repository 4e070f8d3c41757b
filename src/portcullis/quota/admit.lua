-- Admit one request against every limit of one principal and of the levels above it (its team, its
-- organisation): check them all, then take them all, or take nothing. The same algorithm as
-- quota/window.py and MemoryQuotaStore.admit_now.
--
-- It also applies the settlements of this principal's earlier requests that the caller carried
-- along (token corrections, freed concurrency slots): one round trip does both, and the corrections
-- land before the check, so the check sees them.
--
-- KEYS[1..nlev]          each level's windows: a hash with <field>:b, <field>:c, <field>:p per window
--                        (level 1 is the principal, then its team, its organisation, as the plan has them)
-- KEYS[nlev+1..2*nlev]   each level's concurrency leases: a sorted set, lease id -> expiry time
-- KEYS[2*nlev+1..]       one hash per budget and period: s (spent), r (reserved), in micro-units
-- ARGV                   the plan's constants first (the caller encodes them once per plan):
--                          windows ttl, nlev, nwin, {level, field, seconds, limit} * nwin,
--                          {concurrency limit (0: none)} * nlev, lease seconds, nbud, {limit} * nbud,
--                        then this request's values:
--                          now ('' = Redis TIME), tokens, cost, lease id, {seconds to period end} * nbud,
--                          admit (1, or 0: only apply the carried settlements), ncarry,
--                          {token delta, {bucket} * (token windows), lease id or ''} * ncarry
--                        A window whose field starts with 't' counts tokens, any other counts requests.
-- Returns                {failed, index, retry_ms, {bucket, remaining, reset_ms} * nwin}
--                        failed: 0 admitted, 1 window, 2 concurrency (index: the level), 3 budget,
--                        4 larger than the limit

local ttl = tonumber(ARGV[1])
local nlev = tonumber(ARGV[2])
local nwin = tonumber(ARGV[3])
local a = 4 + 4 * nwin
local conc_at = a
local lease_s, nbud = tonumber(ARGV[a + nlev]), tonumber(ARGV[a + nlev + 1])
local limits_at = a + nlev + 2
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

-- One read per level for its windows: {<field>:b, <field>:c, <field>:p} per window.
local level, field, is_tokens, ntok = {}, {}, {}, 0
local names = {}  -- per level: the hash fields it reads, in its windows' order
local slot = {}   -- per window: where its three values sit in its level's read
for l = 1, nlev do names[l] = {} end
for w = 1, nwin do
  local base = 4 * w
  level[w], field[w] = tonumber(ARGV[base]), ARGV[base + 1]
  is_tokens[w] = string.byte(field[w], 1) == 116
  if is_tokens[w] then ntok = ntok + 1 end
  local n = names[level[w]]
  slot[w] = #n
  n[#n + 1], n[#n + 2], n[#n + 3] = field[w] .. ':b', field[w] .. ':c', field[w] .. ':p'
end
local read = {}
for l = 1, nlev do
  if #names[l] > 0 then read[l] = redis.call('HMGET', KEYS[l], unpack(names[l])) else read[l] = {} end
end
-- stored[w] = {b, c, p} as read (strings or false)
local stored = {}
for w = 1, nwin do
  local r, s = read[level[w]], slot[w]
  stored[w] = {r[s + 1], r[s + 2], r[s + 3]}
end

-- Carried settlements: correct the bucket each reservation was taken from (if it still counts).
local dirty = {}
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
        local bucket, b = tonumber(ARGV[base + t]), tonumber(stored[w][1])
        local i = nil
        if bucket == nil or b == nil then i = nil elseif b == bucket then i = 2 elseif b == bucket + 1 then i = 3 end
        if i then
          local n = (tonumber(stored[w][i]) or 0) + delta
          if n < 0 then n = 0 end
          stored[w][i] = n
          dirty[level[w]] = true
          if i == 3 then prev_fixed[w] = true end
        end
      end
    end
  end
  local done = ARGV[base + ntok + 1]
  if done ~= '' then freed[#freed + 1] = done end
end
if #freed > 0 then
  for l = 1, nlev do
    if tonumber(ARGV[conc_at + l - 1]) > 0 then redis.call('ZREM', KEYS[nlev + l], unpack(freed)) end
  end
end

local states = {}
local rolled = {}
for w = 1, nwin do
  local base = 4 * w
  local seconds, limit = tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
  local cost = 1
  if is_tokens[w] then cost = tokens end
  local idx = math.floor(now / seconds)
  local b = tonumber(stored[w][1])
  if b == nil then b = idx; rolled[level[w]] = true end
  local c, p = tonumber(stored[w][2]) or 0, tonumber(stored[w][3]) or 0
  if idx < b then idx = b end
  if idx == b + 1 then p = c; c = 0 elseif idx ~= b then p = 0; c = 0 end
  if idx ~= b then rolled[level[w]] = true end
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

-- Every window's new values, per level: the count always; the bucket and the previous count when it
-- rolled (or a carried settlement corrected the previous count).
local function writes_of(after)
  local writes = {}
  for l = 1, nlev do writes[l] = {} end
  for w = 1, nwin do
    local s, out = states[w], writes[level[w]]
    local n = #out
    local c = s[5]
    if after then c = c + s[3] end
    out[n + 1], out[n + 2] = field[w] .. ':c', c
    if s[4] ~= tonumber(stored[w][1]) or prev_fixed[w] then
      out[n + 3], out[n + 4], out[n + 5], out[n + 6] = field[w] .. ':b', s[4], field[w] .. ':p', s[6]
    end
  end
  return writes
end

if not admit then
  local writes = writes_of(false)
  for l = 1, nlev do
    if dirty[l] and #writes[l] > 0 then redis.call('HSET', KEYS[l], unpack(writes[l])) end
  end
  return {}
end

local held = {}
for l = 1, nlev do
  local conc_limit = tonumber(ARGV[conc_at + l - 1])
  held[l] = 0
  if conc_limit > 0 then
    local key = KEYS[nlev + l]
    held[l] = redis.call('ZCARD', key)
    if held[l] >= conc_limit then
      -- Full: drop leases whose holders died without releasing them (expired), then count again.
      redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
      held[l] = redis.call('ZCARD', key)
      if held[l] >= conc_limit then
        refuse(2, l - 1, math.max(retry, 1))
      end
    end
  end
end

local bkey0 = 2 * nlev
for k = 1, nbud do
  local limit, ends = tonumber(ARGV[limits_at + k - 1]), tonumber(ARGV[ends_at + k - 1])
  local v = redis.call('HMGET', KEYS[bkey0 + k], 's', 'r')
  if (tonumber(v[1]) or 0) + (tonumber(v[2]) or 0) + req_cost > limit then
    refuse(3, k - 1, ends)
  end
end

local out = {failed, index, math.ceil(retry * 1000)}
for w = 1, nwin do
  local s = states[w]
  local seconds, limit, cost, idx, c, p, frac = s[1], s[2], s[3], s[4], s[5], s[6], s[7]
  if failed == 0 then c = c + cost end
  local remaining = math.floor(limit - (p * (1 - frac) + c))
  if remaining < 0 then remaining = 0 end
  local reset = 0
  if c > 0 then reset = (1 - frac) * seconds + seconds elseif p > 0 then reset = (1 - frac) * seconds end
  out[#out + 1] = idx
  out[#out + 1] = remaining
  out[#out + 1] = math.ceil(reset * 1000)
end

if nwin > 0 then
  local writes = writes_of(failed == 0)
  for l = 1, nlev do
    if #writes[l] > 0 and (failed == 0 or dirty[l]) then
      redis.call('HSET', KEYS[l], unpack(writes[l]))
      -- The hash outlives its longest window twice over; refreshed whenever a bucket rolls over.
      if rolled[l] then redis.call('EXPIRE', KEYS[l], ttl) end
    end
  end
end
if failed == 0 then
  for l = 1, nlev do
    if tonumber(ARGV[conc_at + l - 1]) > 0 then
      local key = KEYS[nlev + l]
      redis.call('ZADD', key, now + lease_s, lease)
      -- Kept alive while leases are held by the renewal of live leases (RedisQuotaStore.renew).
      if held[l] == 0 then redis.call('EXPIRE', key, math.ceil(lease_s * 2)) end
    end
  end
  for k = 1, nbud do
    redis.call('HINCRBY', KEYS[bkey0 + k], 'r', req_cost)
    redis.call('EXPIRE', KEYS[bkey0 + k], math.ceil(tonumber(ARGV[ends_at + k - 1])) + 86400)
  end
end
return out
