#!lua name=apikey_ratelimit
-- apikey-ratelimit: GCRA over several limits, the same algorithm as
-- filter/core/src/gcra.rs, for counters shared by every Envoy instance.
-- A Redis 7 function library: envoy/redis-start.sh loads it as the admin
-- user before Redis takes any client, and the filter's user may only FCALL
-- it (no EVAL, no script of anyone's own).
--
--   FCALL apikey_ratelimit_gcra 1 <key> <n> <name_1> <T_1> <C_1> ... <name_n> <T_n> <C_n>
--
-- <key>      the API key's state (a hash of the API key): a HASH with one
--            field per limit name, holding that limit's TAT in microseconds,
--            so adding or removing a limit leaves the others' debt in place
-- <name_i>   limit i's name; T_i its emission interval and C_i its capacity
--            (burst x interval), in microseconds
--
-- The clock is Redis's TIME, so every instance shares one. Lua numbers are
-- doubles, exact for integers up to 2^53: microseconds since 1970 fit.
-- Returns a flat array of integers (what webdis can carry):
--   {allowed (1 or 0), retry_after_us, now_us, reset_1_us, ..., reset_n_us}
-- where reset_i is how long until limit i's bucket is full again. A denial
-- writes nothing; n = 0 writes nothing either (a health check).

local function gcra(keys, args)
  if #keys ~= 1 then
    return redis.error_reply('ERR apikey_ratelimit_gcra: expected 1 key')
  end
  local n = tonumber(args[1])
  if n == nil or n < 0 or n ~= math.floor(n) or #args ~= 1 + 3 * n then
    return redis.error_reply('ERR apikey_ratelimit_gcra: expected n, then n (name, interval, capacity)')
  end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

  local names, intervals, capacities = {}, {}, {}
  for i = 1, n do
    names[i] = args[3 * i - 1]
    intervals[i] = tonumber(args[3 * i])
    capacities[i] = tonumber(args[3 * i + 1])
    if intervals[i] == nil or capacities[i] == nil then
      return redis.error_reply('ERR apikey_ratelimit_gcra: limit ' .. i .. ' is not numeric')
    end
  end

  local tats = {}
  if n > 0 then
    local stored = redis.call('HMGET', keys[1], unpack(names))
    for i = 1, n do
      tats[i] = tonumber(stored[i]) or 0
    end
  end

  local allowed = 1
  local retry = 0
  for i = 1, n do
    local debt = math.max(tats[i], now) - now
    local tolerance = capacities[i] - intervals[i]
    if debt > tolerance then
      allowed = 0
      retry = math.max(retry, debt - tolerance)
    end
  end

  if allowed == 1 and n > 0 then
    local latest = now
    local fields = {}
    for i = 1, n do
      tats[i] = math.max(tats[i], now) + intervals[i]
      latest = math.max(latest, tats[i])
      fields[2 * i - 1] = names[i]
      fields[2 * i] = string.format('%.0f', tats[i])
    end
    redis.call('HSET', keys[1], unpack(fields))
    -- Redis forgets the key once every bucket is full: that state is fresh.
    -- Never sooner: other fields (limits this call does not carry) may run
    -- later, so a new key gets its expiry (NX) and an old one only a later
    -- one (GT). Absolute milliseconds, rounded up, from the same clock.
    local expire_at = string.format('%.0f', math.ceil(latest / 1000))
    if redis.call('PEXPIREAT', keys[1], expire_at, 'NX') == 0 then
      redis.call('PEXPIREAT', keys[1], expire_at, 'GT')
    end
  end

  local out = {allowed, retry, now}
  for i = 1, n do
    out[3 + i] = math.max(tats[i] - now, 0)
  end
  return out
end

redis.register_function('apikey_ratelimit_gcra', gcra)
