-- One failed authentication from a client address, counted in the address's fixed window (it starts at
-- the window's first failure). One script, so concurrent failures from any process count exactly.
-- KEYS[1]: the address's counter. ARGV[1]: the window (ms).
-- Returns {failures in the window so far, ms until the window ends}.
local n = redis.call('INCR', KEYS[1])
local ttl = redis.call('PTTL', KEYS[1])
if n == 1 or ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {n, ttl}
