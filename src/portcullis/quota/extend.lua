-- A stream outgrew its reservation: reserve `more` on every budget if all of them have room, else none.
-- KEYS: budget hashes (s, r). ARGV: more, {limit} * #KEYS. Returns 1 (reserved) or 0 (a budget is spent).
local more = tonumber(ARGV[1])
for k = 1, #KEYS do
  local v = redis.call('HMGET', KEYS[k], 's', 'r')
  if (tonumber(v[1]) or 0) + (tonumber(v[2]) or 0) + more > tonumber(ARGV[1 + k]) then return 0 end
end
for k = 1, #KEYS do redis.call('HINCRBY', KEYS[k], 'r', more) end
return 1
