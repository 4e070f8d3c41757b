-- A stream outgrew its reservation: reserve up to `more` on every budget, as much as all of them have
-- room for (the same amount on each). KEYS: budget hashes (s, r). ARGV: more, {limit} * #KEYS.
-- Returns the amount reserved (0: a budget is spent).
local grant = tonumber(ARGV[1])
for k = 1, #KEYS do
  local v = redis.call('HMGET', KEYS[k], 's', 'r')
  local room = tonumber(ARGV[1 + k]) - (tonumber(v[1]) or 0) - (tonumber(v[2]) or 0)
  if room < grant then grant = room end
end
if grant <= 0 then return 0 end
for k = 1, #KEYS do redis.call('HINCRBY', KEYS[k], 'r', grant) end
return grant
