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
--            A calendar quota (N per day, week or month, whole again at the
--            period's end in a fixed UTC offset) is (<name> -<cost> <code>):
--            a negative T, which functions from before quotas refuse, and
--            code = N*2^16 + kind*2^14 + week_start*2^11 + (offset_min+840),
--            kind 0 day, 1 week, 2 month; week_start 0 Monday .. 6 Sunday.
--            Its field is 'quota#<name>', never a rate's, and holds the
--            period's end plus what was used in it (microseconds as units),
--            so it is a TAT like the others: in the future while anything is
--            used, larger in a later period, and an older period's value is
--            below the current end, which reads as nothing used.
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
-- debt_j_i = max(TAT - now, 0) of its limit i *before* them (for a quota,
-- its value less now, which the filter reads back the same way): the filter
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
-- It refuses quotas: earlier filters never send one.
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

-- Calendar arithmetic on days since 1970-01-01 (proleptic Gregorian),
-- Howard Hinnant's days_from_civil and civil_from_days, as in the filter's
-- calendar.rs: months of 28 to 31 days, leap years but not centuries
-- unless divisible by 400.
local DAY = 86400

local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = m + 9
  if m > 2 then mp = m - 3 end
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp - 9
  if mp < 10 then m = mp + 3 end
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m
end

-- When the period of quota q that contains now (microseconds) ends, in
-- microseconds: the next local midnight, the next week start's, the 1st
-- of the next month's.
local function period_end(now, q)
  local day = math.floor((math.floor(now / 1000000) + q.offset) / DAY)
  local last
  if q.kind == 0 then
    last = day + 1
  elseif q.kind == 1 then
    last = day - ((day + 3) % 7 - q.week_start) % 7 + 7
  else
    local y, m = civil_from_days(day)
    if m == 12 then y, m = y + 1, 1 else m = m + 1 end
    last = days_from_civil(y, m, 1)
  end
  return (last * DAY - q.offset) * 1000000
end

-- A quota of cost `cost` and code `code` (see the top), or nil; a cost
-- above the count could never be admitted (the filter answers 400).
local function read_quota(cost, code)
  if not is_count(cost) or cost < 1 or not is_count(code) then
    return nil
  end
  local rest = code % 65536
  local q = {count = math.floor(code / 65536), cost = cost, kind = math.floor(rest / 16384),
             week_start = math.floor(rest % 16384 / 2048), offset = (rest % 2048 - 840) * 60}
  if q.count < 1 or q.count > 1000000000 or q.cost > q.count or q.kind > 2 or q.week_start > 6
      or q.offset > 840 * 60 then
    return nil
  end
  return q
end

-- Reads the limit set at args[pos]: n, then n (name, interval, capacity),
-- a quota's (name, -cost, code). Returns the set and the position after
-- it, or nil and an error message.
local function read_set(args, pos, what)
  local n = tonumber(args[pos])
  if not is_count(n) or #args < pos + 3 * n then
    return nil, 'ERR ' .. what .. ': expected n, then n (name, interval, capacity)'
  end
  local set = {n = n, names = {}, intervals = {}, capacities = {}, quotas = {}}
  for i = 1, n do
    local at = pos + 3 * (i - 1)
    local step, capacity = tonumber(args[at + 2]), tonumber(args[at + 3])
    if step ~= nil and step < 0 then
      set.quotas[i] = read_quota(-step, capacity)
      if set.quotas[i] == nil then
        return nil, 'ERR ' .. what .. ': quota ' .. i .. ' is not valid'
      end
      set.names[i] = 'quota#' .. args[at + 1]
    else
      if not is_count(step) or step == 0 or not is_count(capacity) then
        return nil, 'ERR ' .. what .. ': limit ' .. i .. ' is not numeric'
      end
      set.names[i] = args[at + 1]
      set.intervals[i] = step
      set.capacities[i] = capacity
    end
  end
  return set, pos + 1 + 3 * n
end

-- Redis forgets a key once every bucket is full: that state is fresh.
-- Never sooner: other fields (limits this call does not carry) may run
-- later, so an existing key only gets a later expiry (GT), and a new one
-- (no expiry yet, which GT never replaces) its first (NX). Try first what
-- the fields read suggest (`fresh`: none stored), so it is usually one
-- command. Absolute milliseconds, rounded up, from the same clock.
local function expire_at_least(key, latest, fresh)
  local expire_at = string.format('%.0f', math.ceil(latest / 1000))
  local first, second = 'GT', 'NX'
  if fresh then first, second = 'NX', 'GT' end
  if redis.call('PEXPIREAT', key, expire_at, first) == 0 then
    redis.call('PEXPIREAT', key, expire_at, second)
  end
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
  -- Quotas: the current period's end, and what was used in it.
  local ends, used = {}, {}
  for i = 1, set.n do
    local T = set.intervals[i]
    local q = set.quotas[i]
    fresh = fresh and stored[i] == false
    local value = tonumber(stored[i]) or 0
    local debt = math.max(value - now, 0)
    debts[i] = debt
    local fits = 0
    if q then
      ends[i] = period_end(now, q)
      used[i] = math.max(value - ends[i], 0)
      -- Request r (0-based) fits iff used + (r+1)*cost <= N.
      local left = q.count - used[i]
      if left >= q.cost then
        fits = math.floor(left / q.cost)
        if fits * q.cost > left then fits = fits - 1 end
        if (fits + 1) * q.cost <= left then fits = fits + 1 end
      end
    else
      -- Request r (0-based) fits iff debt + r*T <= C - T.
      local room = set.capacities[i] - T - debt
      if room >= 0 then
        fits = math.floor(room / T) + 1
        -- The division is rounded; settle it with exact integer products.
        if (fits - 1) * T > room then fits = fits - 1 end
        if fits * T <= room then fits = fits + 1 end
      end
    end
    if fits < admitted then admitted = fits end
  end
  if admitted > 0 and set.n > 0 then
    local latest = now
    local fields = {}
    for i = 1, set.n do
      local tat
      if set.quotas[i] then
        tat = ends[i] + used[i] + admitted * set.quotas[i].cost
      else
        tat = now + debts[i] + admitted * set.intervals[i]
      end
      latest = math.max(latest, tat)
      fields[2 * i - 1] = set.names[i]
      fields[2 * i] = string.format('%.0f', tat)
    end
    redis.call('HSET', key, unpack(fields))
    expire_at_least(key, latest, fresh)
  end
  return admitted, debts
end

-- Appends a key's decision to a reply: admitted, then one debt per limit.
local function push_decision(out, admitted, debts)
  out[#out + 1] = admitted
  for i = 1, #debts do
    out[#out + 1] = debts[i]
  end
end

-- Reads the one limit set at args[pos] that must end the arguments.
-- Returns the set, or nil and the error reply.
local function read_only_set(args, pos, what)
  local set, after = read_set(args, pos, what)
  if set == nil then
    return nil, redis.error_reply(after)
  end
  if after ~= #args + 1 then
    return nil, redis.error_reply('ERR ' .. what .. ': expected n, then n (name, interval, capacity)')
  end
  return set
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
    push_decision(out, decide(keys[j], set, count, now))
  end
  return out
end

-- A plan's limits followed by a rules' set, as one set.
local function join(plan, rules)
  local set = {n = plan.n + rules.n, names = {}, intervals = {}, capacities = {}, quotas = {}}
  local k = 0
  for _, part in ipairs({plan, rules}) do
    for i = 1, part.n do
      k = k + 1
      set.names[k] = part.names[i]
      set.intervals[k] = part.intervals[i]
      set.capacities[k] = part.capacities[i]
      set.quotas[k] = part.quotas[i]
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
    out[#out + 1] = answer
    push_decision(out, decide(keys[j + 1], limits, count, now))
  end
  return out
end

local function gcra(keys, args)
  local what = 'apikey_ratelimit_gcra'
  if #keys ~= 1 then
    return redis.error_reply('ERR ' .. what .. ': expected 1 key')
  end
  local set, err = read_only_set(args, 1, what)
  if set == nil then
    return err
  end
  for i = 1, set.n do
    if set.quotas[i] then
      return redis.error_reply('ERR ' .. what .. ': limit ' .. i .. ' is a quota, which only apikey_ratelimit_batch decides')
    end
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

-- apikey_ratelimit_admin is an operator's call on one key (the admin API):
--
--   FCALL apikey_ratelimit_admin 2 <key> <prefix>epoch <nonce> <op> <amount> <n> (<name> <T> <C>) x n
--   -> {nonce, now_us, debt_1, ..., debt_n}
--
-- <op> 0 inspects, 1 resets (every field of the set to 0: full buckets,
-- nothing used in the period), 2 grants: each rate's TAT less amount x T,
-- never below now (a full bucket), each quota's use less amount, never
-- below 0. The debts are those after the change, as apikey_ratelimit_batch
-- answers them for a count of 0. Only fields the key holds are written, and
-- never its expiry: values only go down, so the expiry stays late enough.
-- A reset or grant also counts up <prefix>epoch (a hash, field n, before
-- anything else is written, so a key that holds no count fails the call
-- first):
-- every filter worker polls it (apikey_ratelimit_epoch, below) and stops
-- trusting the denials it cached before, so the change reaches every
-- replica. The 1-key form of earlier filters counts nothing.
-- The most a quota's used count holds (the filter packs it in 30 bits),
-- and how far past now a charge may put a TAT (50 years, in microseconds).
local MAX_USED = 2^30 - 1
local MAX_DEBT = 50 * 365 * 86400 * 1000000

-- Limit i's stored value after a refund (or a charge) of `amount` units
-- at `now`, as settle.rs's `apply`: a refund lowers a rate's debt by
-- amount intervals but never below a full bucket, and a quota's used count
-- but never below 0; a charge raises them, a rate's TAT at most MAX_DEBT
-- past now, in the quota's current period.
local function adjusted(value, set, i, refund, amount, now)
  local q = set.quotas[i]
  if q then
    local e = period_end(now, q)
    local used = math.max(value - e, 0)
    if refund then
      if used > 0 then return e + math.max(used - amount, 0) end
      return value
    end
    return e + math.min(used + amount, MAX_USED)
  end
  local T = set.intervals[i]
  if refund then
    if value > now then return math.max(value - amount * T, now) end
    return value
  end
  return math.min(math.max(value, now) + amount * T, now + MAX_DEBT)
end

local function admin(keys, args)
  local what = 'apikey_ratelimit_admin'
  if #keys ~= 1 and #keys ~= 2 then
    return redis.error_reply('ERR ' .. what .. ': expected the key, then the epoch key')
  end
  local nonce, op, amount = tonumber(args[1]), tonumber(args[2]), tonumber(args[3])
  if not is_count(nonce) or not is_count(op) or op > 2 or not is_count(amount) then
    return redis.error_reply('ERR ' .. what .. ': expected the nonce, an op (0, 1 or 2) and an amount')
  end
  local set, err = read_only_set(args, 4, what)
  if set == nil then
    return err
  end
  local now = clock()
  local stored = {}
  if set.n > 0 then
    stored = redis.call('HMGET', keys[1], unpack(set.names))
  end
  local fields = {}
  local out = {nonce, now}
  for i = 1, set.n do
    local value = tonumber(stored[i]) or 0
    if stored[i] and op > 0 then
      if op == 1 then
        value = 0
      else
        value = adjusted(value, set, i, true, amount, now)
      end
      fields[#fields + 1] = set.names[i]
      fields[#fields + 1] = string.format('%.0f', value)
    end
    out[#out + 1] = math.max(value - now, 0)
  end
  if op > 0 and keys[2] then
    -- A hash (HMGET and HSET are all the filter's user may run): field n.
    -- Counted before anything else is written, so a key that holds no
    -- count fails the call first (WRONGTYPE, or the check below).
    if keys[2] == keys[1] then
      return redis.error_reply('ERR ' .. what .. ': the epoch key is the state')
    end
    local counted = redis.call('HMGET', keys[2], 'n')[1]
    local n = tonumber(counted) or 0
    if counted and not is_count(n) then
      return redis.error_reply('ERR ' .. what .. ': the epoch key holds no count')
    end
    redis.call('HSET', keys[2], 'n', string.format('%.0f', n + 1))
  end
  if #fields > 0 then
    redis.call('HSET', keys[1], unpack(fields))
  end
  return out
end

-- apikey_ratelimit_epoch reads the admin epoch (see apikey_ratelimit_admin),
-- writing nothing (so it is registered no-writes):
--
--   FCALL apikey_ratelimit_epoch 1 <prefix>epoch <nonce>
--   -> {nonce, epoch}                       -- 0 while no reset or grant
local function epoch(keys, args)
  local what = 'apikey_ratelimit_epoch'
  local nonce = tonumber(args[1])
  if #keys ~= 1 or #args ~= 1 or not is_count(nonce) then
    return redis.error_reply('ERR ' .. what .. ': expected 1 key and the nonce')
  end
  local stored = redis.call('HMGET', keys[1], 'n')[1]
  if stored == false then
    return {nonce, 0}
  end
  local value = tonumber(stored)
  if not is_count(value) then
    return redis.error_reply('ERR ' .. what .. ': the epoch key holds no count')
  end
  return {nonce, value}
end

-- apikey_ratelimit_settle: requests' real costs, once their responses said
-- them (see settle.rs): each entry refunds (op 0) or charges (op 1) `amount`
-- units on one key's limit set. Every argument is checked before anything
-- is written.
--
--   FCALL apikey_ratelimit_settle <m> <key_1> ... <key_m> <nonce>
--         [<op> <amount> <n> (<name> <T> <C>) x n] x m
--   -> {nonce, now_us}
local function settle(keys, args)
  local what = 'apikey_ratelimit_settle'
  local nonce = tonumber(args[1])
  if not is_count(nonce) then
    return redis.error_reply('ERR ' .. what .. ': expected the nonce')
  end
  local entries = {}
  local pos = 2
  for j = 1, #keys do
    local op, amount = tonumber(args[pos]), tonumber(args[pos + 1])
    if not is_count(op) or op > 1 or not is_count(amount) then
      return redis.error_reply('ERR ' .. what .. ': entry ' .. j .. ' needs an op (0 or 1) and an amount')
    end
    local set, after = read_set(args, pos + 2, what)
    if set == nil then
      return redis.error_reply(after)
    end
    entries[j] = {refund = op == 0, amount = amount, set = set}
    pos = after
  end
  if pos ~= #args + 1 then
    return redis.error_reply('ERR ' .. what .. ': expected ' .. #keys .. ' entries and nothing after')
  end
  local now = clock()
  for j = 1, #keys do
    local e = entries[j]
    local set = e.set
    if set.n > 0 then
      local stored = redis.call('HMGET', keys[j], unpack(set.names))
      local fields = {}
      local latest = now
      local fresh = true
      for i = 1, set.n do
        fresh = fresh and stored[i] == false
        -- A refund of nothing stored gives nothing back.
        if stored[i] or not e.refund then
          local value = adjusted(tonumber(stored[i]) or 0, set, i, e.refund, e.amount, now)
          latest = math.max(latest, value)
          fields[#fields + 1] = set.names[i]
          fields[#fields + 1] = string.format('%.0f', value)
        end
      end
      if #fields > 0 then
        redis.call('HSET', keys[j], unpack(fields))
        if not e.refund then expire_at_least(keys[j], latest, fresh) end
      end
    end
  end
  return {nonce, now}
end

redis.register_function('apikey_ratelimit_batch', batch)
redis.register_function('apikey_ratelimit_admin', admin)
redis.register_function('apikey_ratelimit_batch2', batch2)
redis.register_function('apikey_ratelimit_gcra', gcra)
redis.register_function('apikey_ratelimit_settle', settle)
redis.register_function{function_name = 'apikey_ratelimit_epoch', callback = epoch, flags = {'no-writes'}}
