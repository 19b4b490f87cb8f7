#!lua name=apikey_ratelimit
-- apikey-ratelimit: GCRA over several limits, the same algorithm as
-- filter/core/src/gcra.rs, for counters shared by every Envoy instance.
-- A Redis 7 function library: envoy/redis-start.sh loads it as the admin
-- user before Redis takes any client, and the filter's user may only FCALL
-- it (no EVAL, no script of anyone's own).
--
-- The filter calls one function per batch of waiting requests:
--
--   FCALL apikey_ratelimit_batch <m> <key_1> ... <key_m> <nonce>
--         <s> [<n> (<name> <T> <C>) x n] x s     -- the limit sets, once each
--         [<set> <count>] x m                    -- per key: its set (1-based), its requests
--
-- <key_j>    a key's state (a hash of the API key): a HASH with one field per
--            limit name, holding that limit's TAT in microseconds, so adding
--            or removing a limit leaves the others' debt in place
-- <name>     a limit's name; T its emission interval and C its capacity
--            (burst x interval), in microseconds
-- <count>    how many requests of that key arrived, in arrival order
-- <nonce>    the call's own number, answered first: webdis 0.1.9 can hand the
--            reply of a call Envoy gave up on to a later call, which must
--            then see that the reply is not its own
--
-- Every key is decided at one Redis TIME, in order, exactly as if its
-- requests had reached Redis back to back: the first ones fit, and once one
-- is denied the rest are too (a denial changes nothing and the clock does
-- not move). Returns a flat array of integers (what webdis can carry):
--   {nonce, now_us, [admitted_j, debt_j_1, ..., debt_j_n] x m}
-- where admitted_j is how many of key j's requests were admitted and
-- debt_j_i = max(TAT - now, 0) of its limit i *before* them: the filter
-- replays the same arithmetic to give each request its own decision,
-- Retry-After and quota headers, and checks it agrees on admitted_j.
-- A denial writes nothing; m = 0 writes nothing either.
--
-- apikey_ratelimit_batch2 is the same when keys' plans are read from Redis
-- (store.webdis.plans_from_redis): an operator puts a key on a plan with
-- HSET <prefix>plans <field> <plan>, and its next request is decided on it.
--
--   FCALL apikey_ratelimit_batch2 <1+m> <prefix>plans <key_1> ... <key_m> <nonce>
--         <p> <q> [<plan> <n> (<name> <T> <C>) x n] x p   -- plans, once each
--         <s> [<n> (<name> <T> <C>) x n] x s             -- the rules' limit sets
--         [<plan> <set> <count>] x m                     -- per key: its plan in the
--                                                         -- configuration, its rules' set
--
-- <field>    key_j without <prefix>: the hex SHA-256 (or HMAC) of the API key
-- <plan>     a plan's name, then its key-wide limits; Redis may name only the
--            first q plans (the others are the configuration's own, such as
--            overrides, given as a key's fallback)
--
-- One HMGET reads every key's plan. A key whose field names one of the
-- first q plans is decided on that plan's limits and its rules' set; one
-- without a field on its configured plan; one whose field names another
-- plan on its configured plan too, answered as plan 0. Returns
--   {nonce, now_us, [plan_j, admitted_j, debt_j_1, ..., debt_j_n] x m}
-- with plan_j the plan used (1-based, or 0 as above) and the debts of its
-- limits then its set's.
--
-- apikey_ratelimit_gcra is the one-request form that earlier filters call
-- (and the health checks, with n = 0), kept so that a rolling update works:
--
--   FCALL apikey_ratelimit_gcra 1 <key> <n> <name_1> <T_1> <C_1> ... <name_n> <T_n> <C_n>
--   -> {allowed (1 or 0), retry_after_us, now_us, reset_1_us, ..., reset_n_us}
--
-- The clock is Redis's TIME, so every instance shares one. Lua numbers are
-- doubles, exact for integers up to 2^53: microseconds since 1970 fit, and
-- the filter refuses capacities past 50 years.

local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- The largest number a call may carry. 2^52 microseconds is 142 years, far
-- past any capacity the filter sends, and keeps now + capacity below 2^53,
-- exact in a double, until the year 2112. tonumber() also reads 'inf' and
-- '1e300': such a value is refused, as a negative or fractional one is,
-- before anything is written.
local MAX = 2^52

local function is_count(x)
  return x ~= nil and x >= 0 and x <= MAX and x == math.floor(x)
end

-- Reads the limit set at args[pos]: n, then n (name, interval, capacity).
-- Returns the set and the position after it, or nil and an error message.
local function read_set(args, pos, what)
  local n = tonumber(args[pos])
  if not is_count(n) or #args < pos + 3 * n then
    return nil, 'ERR ' .. what .. ': expected n, then n (name, interval, capacity)'
  end
  local set = {n = n, names = {}, intervals = {}, capacities = {}}
  for i = 1, n do
    local at = pos + 3 * (i - 1)
    set.names[i] = args[at + 1]
    set.intervals[i] = tonumber(args[at + 2])
    set.capacities[i] = tonumber(args[at + 3])
    if not is_count(set.intervals[i]) or set.intervals[i] == 0 or not is_count(set.capacities[i]) then
      return nil, 'ERR ' .. what .. ': limit ' .. i .. ' is not numeric'
    end
  end
  return set, pos + 1 + 3 * n
end

-- Decides `count` requests of `key` under `set` at `now`: how many are
-- admitted, and each limit's debt before them. Writes the key only if one
-- is admitted. One HMGET, and for an admission one HSET and (usually) one
-- PEXPIREAT: the per-key work is kept this small on purpose.
local function decide(key, set, count, now)
  local debts = {}
  local admitted = count
  local stored = {}
  if set.n > 0 then
    stored = redis.call('HMGET', key, unpack(set.names))
  end
  -- No field of this set stored: most likely no key at all.
  local fresh = true
  for i = 1, set.n do
    local T = set.intervals[i]
    fresh = fresh and stored[i] == false
    local debt = math.max((tonumber(stored[i]) or 0) - now, 0)
    debts[i] = debt
    -- Request r (0-based) fits iff debt + r*T <= C - T.
    local room = set.capacities[i] - T - debt
    local fits = 0
    if room >= 0 then
      fits = math.floor(room / T) + 1
      -- The division is rounded; settle it with exact integer products.
      if (fits - 1) * T > room then fits = fits - 1 end
      if fits * T <= room then fits = fits + 1 end
    end
    if fits < admitted then admitted = fits end
  end
  if admitted > 0 and set.n > 0 then
    local latest = now
    local fields = {}
    for i = 1, set.n do
      local tat = now + debts[i] + admitted * set.intervals[i]
      latest = math.max(latest, tat)
      fields[2 * i - 1] = set.names[i]
      fields[2 * i] = string.format('%.0f', tat)
    end
    redis.call('HSET', key, unpack(fields))
    -- Redis forgets the key once every bucket is full: that state is fresh.
    -- Never sooner: other fields (limits this call does not carry) may run
    -- later, so an existing key only gets a later expiry (GT), and a new
    -- one (no expiry yet, which GT never replaces) its first (NX). Try
    -- first what the fields read suggest, so it is usually one command.
    -- Absolute milliseconds, rounded up, from the same clock.
    local expire_at = string.format('%.0f', math.ceil(latest / 1000))
    local first, second = 'GT', 'NX'
    if fresh then first, second = 'NX', 'GT' end
    if redis.call('PEXPIREAT', key, expire_at, first) == 0 then
      redis.call('PEXPIREAT', key, expire_at, second)
    end
  end
  return admitted, debts
end

-- Reads n sets from args[pos] on. Returns them and the position after
-- them, or nil and an error message.
local function read_sets(args, pos, n, what)
  local sets = {}
  for j = 1, n do
    local set, next_or_error = read_set(args, pos, what)
    if set == nil then
      return nil, next_or_error
    end
    sets[j] = set
    pos = next_or_error
  end
  return sets, pos
end

local function batch(keys, args)
  local what = 'apikey_ratelimit_batch'
  local nonce = tonumber(args[1])
  if not is_count(nonce) then
    return redis.error_reply('ERR ' .. what .. ': expected the call\'s nonce')
  end
  local s = tonumber(args[2])
  if not is_count(s) then
    return redis.error_reply('ERR ' .. what .. ': expected the number of limit sets')
  end
  local sets, pos = read_sets(args, 3, s, what)
  if sets == nil then
    return redis.error_reply(pos)
  end
  if #args ~= pos - 1 + 2 * #keys then
    return redis.error_reply('ERR ' .. what .. ': expected one (set, count) per key')
  end
  local entries = {}
  for j = 1, #keys do
    local set = sets[tonumber(args[pos])]
    local count = tonumber(args[pos + 1])
    if set == nil or not is_count(count) then
      return redis.error_reply('ERR ' .. what .. ': key ' .. j .. ' has no valid set and count')
    end
    entries[j] = {set, count}
    pos = pos + 2
  end
  local now = clock()
  local out = {nonce, now}
  for j = 1, #keys do
    local set, count = entries[j][1], entries[j][2]
    local admitted, debts = decide(keys[j], set, count, now)
    out[#out + 1] = admitted
    for i = 1, set.n do
      out[#out + 1] = debts[i]
    end
  end
  return out
end

-- A plan's limits followed by a rules' set, as one set.
local function join(plan, rules)
  local set = {n = plan.n + rules.n, names = {}, intervals = {}, capacities = {}}
  for _, part in ipairs({plan, rules}) do
    for i = 1, part.n do
      set.names[#set.names + 1] = part.names[i]
      set.intervals[#set.intervals + 1] = part.intervals[i]
      set.capacities[#set.capacities + 1] = part.capacities[i]
    end
  end
  return set
end

local function batch2(keys, args)
  local what = 'apikey_ratelimit_batch2'
  local plans_key = keys[1]
  local suffix = 'plans'
  if plans_key == nil or string.sub(plans_key, -#suffix) ~= suffix then
    return redis.error_reply('ERR ' .. what .. ': expected the plans key first')
  end
  local prefix = string.sub(plans_key, 1, #plans_key - #suffix)
  local m = #keys - 1
  local nonce = tonumber(args[1])
  if not is_count(nonce) then
    return redis.error_reply('ERR ' .. what .. ': expected the call\'s nonce')
  end
  local p, q = tonumber(args[2]), tonumber(args[3])
  if not is_count(p) or not is_count(q) or q > p then
    return redis.error_reply('ERR ' .. what .. ': expected the number of plans, then how many Redis may name')
  end
  local plans, by_name = {}, {}
  local pos = 4
  for j = 1, p do
    local name = args[pos]
    local plan, next_or_error = read_set(args, pos + 1, what)
    if name == nil or plan == nil then
      return redis.error_reply(next_or_error or ('ERR ' .. what .. ': plan ' .. j .. ' has no name'))
    end
    plans[j] = plan
    if j <= q and by_name[name] == nil then
      by_name[name] = j
    end
    pos = next_or_error
  end
  local s = tonumber(args[pos])
  if not is_count(s) then
    return redis.error_reply('ERR ' .. what .. ': expected the number of limit sets')
  end
  local sets, after = read_sets(args, pos + 1, s, what)
  if sets == nil then
    return redis.error_reply(after)
  end
  pos = after
  if #args ~= pos - 1 + 3 * m then
    return redis.error_reply('ERR ' .. what .. ': expected one (plan, set, count) per key')
  end
  local entries, fields = {}, {}
  for j = 1, m do
    local key = keys[j + 1]
    local plan = tonumber(args[pos])
    local set = sets[tonumber(args[pos + 1])]
    local count = tonumber(args[pos + 2])
    if plans[plan] == nil or set == nil or not is_count(count) then
      return redis.error_reply('ERR ' .. what .. ': key ' .. j .. ' has no valid plan, set and count')
    end
    if string.sub(key, 1, #prefix) ~= prefix or #key == #prefix then
      return redis.error_reply('ERR ' .. what .. ': key ' .. j .. ' is not under the plans key\'s prefix')
    end
    entries[j] = {plan, set, count}
    fields[j] = string.sub(key, #prefix + 1)
    pos = pos + 3
  end
  local named = {}
  if m > 0 then
    named = redis.call('HMGET', plans_key, unpack(fields))
  end
  local now = clock()
  local out = {nonce, now}
  -- Each (plan, set) pair joined once.
  local joined = {}
  for j = 1, m do
    local plan, set, count = entries[j][1], entries[j][2], entries[j][3]
    local answer = plan
    if named[j] then
      local chosen = by_name[named[j]]
      if chosen then
        plan, answer = chosen, chosen
      else
        answer = 0
      end
    end
    joined[plan] = joined[plan] or {}
    local limits = joined[plan][set]
    if limits == nil then
      limits = join(plans[plan], set)
      joined[plan][set] = limits
    end
    local admitted, debts = decide(keys[j + 1], limits, count, now)
    out[#out + 1] = answer
    out[#out + 1] = admitted
    for i = 1, limits.n do
      out[#out + 1] = debts[i]
    end
  end
  return out
end

local function gcra(keys, args)
  local what = 'apikey_ratelimit_gcra'
  if #keys ~= 1 then
    return redis.error_reply('ERR ' .. what .. ': expected 1 key')
  end
  local set, after = read_set(args, 1, what)
  if set == nil then
    return redis.error_reply(after)
  end
  if after ~= #args + 1 then
    return redis.error_reply('ERR ' .. what .. ': expected n, then n (name, interval, capacity)')
  end
  local now = clock()
  local admitted, debts = decide(keys[1], set, 1, now)
  local retry = 0
  local out = {admitted, 0, now}
  for i = 1, set.n do
    local reset = debts[i]
    if admitted == 1 then
      reset = reset + set.intervals[i]
    else
      retry = math.max(retry, debts[i] - (set.capacities[i] - set.intervals[i]))
    end
    out[3 + i] = reset
  end
  out[2] = retry
  return out
end

redis.register_function('apikey_ratelimit_batch', batch)
redis.register_function('apikey_ratelimit_batch2', batch2)
redis.register_function('apikey_ratelimit_gcra', gcra)
