-- apikey-ratelimit: GCRA over several limits, the same algorithm as
-- filter/core/src/gcra.rs, for counters shared by every Envoy instance.
--
-- KEYS[1]            the API key's state: one TAT per limit, in microseconds,
--                    space-separated (the key is a hash of the API key)
-- ARGV[1]            n, the number of limits
-- ARGV[2i], [2i+1]   limit i's emission interval and capacity (burst x
--                    interval), in microseconds
--
-- The clock is Redis's TIME, so every instance shares one. Lua numbers are
-- doubles, exact for integers up to 2^53: microseconds since 1970 fit.
-- Returns a flat array of integers (what webdis can carry):
--   {allowed (1 or 0), retry_after_us, now_us, reset_1_us, ..., reset_n_us}
-- where reset_i is how long until limit i's bucket is full again.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = tonumber(ARGV[1])

local tats = {}
local stored = redis.call('GET', KEYS[1])
if stored then
  for v in string.gmatch(stored, '%d+') do
    tats[#tats + 1] = tonumber(v)
  end
end
if #tats ~= n then
  -- Absent, or written under another configuration: start fresh.
  tats = {}
  for i = 1, n do
    tats[i] = 0
  end
end

local allowed = 1
local retry = 0
for i = 1, n do
  local interval = tonumber(ARGV[2 * i])
  local capacity = tonumber(ARGV[2 * i + 1])
  local debt = math.max(tats[i], now) - now
  local tolerance = capacity - interval
  if debt > tolerance then
    allowed = 0
    retry = math.max(retry, debt - tolerance)
  end
end

if allowed == 1 then
  local latest = now
  local parts = {}
  for i = 1, n do
    tats[i] = math.max(tats[i], now) + tonumber(ARGV[2 * i])
    latest = math.max(latest, tats[i])
    parts[i] = string.format('%.0f', tats[i])
  end
  -- Redis forgets the key once every bucket is full: that state is fresh.
  redis.call('SET', KEYS[1], table.concat(parts, ' '), 'PX', math.ceil((latest - now) / 1000))
end

local out = {allowed, retry, now}
for i = 1, n do
  out[3 + i] = math.max(tats[i] - now, 0)
end
return out
