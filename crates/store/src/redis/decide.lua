-- tollgate: one decision over every limit of a request, in one round trip.
--
-- Why Lua: the decision reads every limit's state, decides all-or-nothing and
-- writes the new states; as one script it is atomic on the Redis server, so
-- N processes sharing these keys never over-admit (a client that reads, then
-- writes, races: two clients read the same count and both admit). The
-- algorithms are tollgate-core's (decide.rs, algo/*.rs), ported line by line;
-- the conformance suite (crates/store/tests/conformance.rs) runs against both.
--
-- Time: Redis TIME (one clock for the whole fleet), or a caller's instant for
-- tests with a fake clock. Every instant here is nanoseconds RELATIVE to that
-- now, so Lua's doubles stay exact (|t| < 2^53 ns, about 104 days; the Rust
-- side refuses limits that would need more). Stored instants are absolute,
-- "SECONDS:NANOS".
--
-- One call makes one or more decisions, in order, each all-or-nothing over
-- its own limits, as if each were a call of its own: under load the store
-- sends the decisions queued meanwhile together (fewer calls than
-- decisions; each decision still takes exactly one round trip).
--
-- KEYS     the states of every decision's slots, decision after decision:
--          {prefix}:{namespace}:{limit}:{fingerprint}:{variant}:{key}
-- ARGV     per decision: four values, then its slots' fields:
--   op     "d" decide, "u" usage only (writes nothing),
--          "f" finish: debit latency (latency limits) or release (concurrency)
--   now    "" for Redis TIME (read once per call), else "SECONDS:NANOS"
--   third  "1" if the request may be held (reserve a future instant), else "0";
--          for "f": the latency to debit, in microseconds
--   n      its slot count (it takes the next n KEYS)
--   then per slot, in KEYS order: a field count, then that many fields:
--          algorithm, cost, charge, hold (ns), shadow (0/1), settle (f: 1 release, 2 debit, 0 none),
--          then the algorithm's parameters:
--   g  token/leaky bucket (GCRA): capacity amount period whole rem tau_ns tau_frac
--   f  fixed window: quota CALENDAR
--   s  sliding window: quota every segment segments
--   t  tiered: tiers, then per tier: quota CALENDAR
--   c  concurrency: max
--   CALENDAR is "F every offset" (a fixed UTC offset, ns, 0 <= offset < every)
--   or "N every count b1 .. bcount" (window boundaries of a zone with DST,
--   computed by the caller around its clock; extrapolated by `every` beyond).
-- Returns the decisions' replies one after the other; for "d" and "u": {kind, a, b, c, then per slot: allowed, remaining, reset, retry_after}
--   kind 0 admit (a = delay ns); 1 deny (a = slot, 0-based; b = retry_after ns or -1 when only a
--   release can make room); 2 never (a = slot, b = cost, c = capacity). retry_after -1 = none.
-- Returns for "f": {0}.
-- Keys expire on their own once their state is at rest (a fresh state would
-- decide the same); an in-flight count lives CONCURRENCY_TTL past its last change.

local BIL = 1000000000
local CONCURRENCY_TTL_MS = 3600000
local AT, ON_RELEASE, NEVER = 0, 1, 2
local INF = math.huge

-- now, for the decision being made (set per decision); Redis TIME is read
-- once per call.
local nowS, nowN
local server_time

-- "S:N" -> ns relative to now; "x" (nothing stored) -> nil.
local function rel(text)
  local s, n = string.match(text, '^(-?%d+):(%d+)$')
  if not s then return nil end
  return (tonumber(s) - nowS) * BIL + (tonumber(n) - nowN)
end

local function abs(r)
  local total = nowN + r
  local s = math.floor(total / BIL)
  return string.format('%d:%d', nowS + s, total - s * BIL)
end

-- now (absolute) modulo g, exactly: g is whole seconds, or below 9e14 ns.
local function nowmod(g)
  if g % BIL == 0 then
    return (nowS % (g / BIL)) * BIL + nowN
  end
  local x = nowS % g
  for _ = 1, 9 do x = (x * 10) % g end
  return (x + nowN) % g
end

local argv = ARGV
local pos = 1
local function field()
  local v = argv[pos]
  pos = pos + 1
  return v
end
local function num() return tonumber(field()) end

-- A calendar: win(t) -> start, end of the window holding t.
local function calendar()
  local kind, every = field(), num()
  if kind == 'F' then
    local phase = (nowmod(every) + num()) % every
    return function(t)
      local s = t - (phase + t) % every
      return s, s + every
    end
  end
  local b = {}
  for i = 1, num() do b[i] = rel(field()) end
  local n = #b
  return function(t)
    if t < b[1] then
      local s = b[1] - math.ceil((b[1] - t) / every) * every
      return s, s + every
    end
    if t >= b[n] then
      local s = b[n] + math.floor((t - b[n]) / every) * every
      return s, s + every
    end
    local lo, hi = 1, n
    while hi - lo > 1 do
      local mid = math.floor((lo + hi) / 2)
      if b[mid] <= t then lo = mid else hi = mid end
    end
    return b[lo], b[hi]
  end
end

-- Two window counters {start, used, start, used}: the current window and,
-- for reservations, the next (core's TwoWindows).
local function two_load(text, i)
  local s1, u1, s2, u2 = string.match(text, '([^|]+)|(%d+)|([^|]+)|(%d+)', i)
  return { rel(s1) or -INF, tonumber(u1), rel(s2) or -INF, tonumber(u2) }
end
local function two_save(w)
  local function one(s, u) return (u > 0 and abs(s) or 'x') .. '|' .. string.format('%d', u) end
  return one(w[1], w[2]) .. '|' .. one(w[3], w[4])
end
local function two_used(w, start)
  if w[1] == start and w[2] > 0 then return w[2] end
  if w[3] == start and w[4] > 0 then return w[4] end
  return 0
end
local function two_add(w, start, current, amount)
  if w[1] == start then w[2] = w[2] + amount return end
  if w[3] == start then w[4] = w[4] + amount return end
  -- the first slot that is dead (older than now's window) or empty, else the first
  if w[1] < current or w[2] == 0 or not (w[3] < current or w[4] == 0) then w[1], w[2] = start, amount
  else w[3], w[4] = start, amount end
end
local function two_rest(w, current)
  return (w[2] == 0 or w[1] < current) and (w[4] == 0 or w[3] < current)
end
-- Until when a TwoWindows is not at rest (relative ns), or nil.
local function two_busy_until(w, win)
  local last
  for j = 1, 3, 2 do
    if w[j + 1] > 0 then
      local _, e = win(w[j])
      if not last or e > last then last = e end
    end
  end
  return last
end

---------------------------------------------------------------- meters
-- Each meter: earliest(now, cost, from) -> kind, value; reservable(now, at);
-- commit(now, cost, at); debit(now, amount); release(amount); usage(now) ->
-- remaining, reset; save() -> text or nil (at rest: delete), ttl in ms.

local function gcra(state)
  local cap, amount, period, whole, rem, taun, tauf = num(), num(), num(), num(), num(), num(), num()
  local tn, tf = -INF, 0
  if state then
    local s, f = string.match(state, '^([^|]+)|(%d+)$')
    tn, tf = rel(s), tonumber(f)
  end
  local function add(an, af, bn, bf)
    local f = af + bf
    if f >= amount then return an + bn + 1, f - amount end
    return an + bn, f
  end
  local function span(cost)
    if cost == 1 then return whole, rem end
    local r = cost * rem
    return cost * whole + math.floor(r / amount), r % amount
  end
  local function le(an, af, bn, bf) return an < bn or (an == bn and af <= bf) end
  -- a - b rounded up to a whole ns (an instant minus a span: may be negative)
  local function diff_ceil(an, af, bn, bf)
    local ns, f = an - bn, af - bf
    if f < 0 then ns, f = ns - 1, f + amount end
    if f > 0 then ns = ns + 1 end
    return ns
  end
  local m = {}
  function m.earliest(_, cost, from)
    if cost > cap then return NEVER, cap end
    local sn, sf = span(cost)
    local dn, df = add(tn, tf, sn, sf)
    return AT, math.max(from, diff_ceil(dn, df, taun, tauf))
  end
  function m.reservable() return true end
  function m.commit(_, cost, at)
    local bn, bf = tn, tf
    if le(bn, bf, at, 0) then bn, bf = at, 0 end
    local sn, sf = span(cost)
    tn, tf = add(bn, bf, sn, sf)
  end
  function m.debit(now, amount_) m.commit(now, amount_, now) end
  function m.release() end
  function m.usage(now)
    if le(tn, tf, now, 0) then return cap, 0 end
    local fn, ff = add(now, 0, taun, tauf)
    if le(fn, ff, tn, tf) then
      local nn, nf = add(tn, tf, whole, rem)
      return 0, math.max(0, diff_ceil(nn, nf, fn, ff))
    end
    local slack = (fn - tn) * amount + (ff - tf)
    local remaining = math.floor(slack / period)
    return remaining, math.ceil(((remaining + 1) * period - slack) / amount)
  end
  function m.save()
    if le(tn, tf, 0, 0) then return nil end
    return abs(tn) .. '|' .. string.format('%d', tf), math.ceil(tn / 1000000)
  end
  return m
end

local function fixed_window(state)
  local quota = num()
  local win = calendar()
  local w = state and two_load(state, 1) or { -INF, 0, -INF, 0 }
  local m = {}
  function m.earliest(_, cost, from)
    if cost > quota then return NEVER, quota end
    local s, e = win(from)
    for _ = 1, 3 do
      if two_used(w, s) + cost <= quota then return AT, math.max(from, s) end
      s, e = win(e)
    end
    return AT, s
  end
  function m.reservable(now, at)
    local _, e = win(now)
    local _, e2 = win(e)
    return at < e2
  end
  function m.commit(now, cost, at)
    local current = win(now)
    two_add(w, (win(at)), current, cost)
  end
  function m.debit(now, amount)
    local current = win(now)
    two_add(w, current, current, amount)
  end
  function m.release() end
  function m.usage(now)
    local s, e = win(now)
    local used = two_used(w, s)
    return math.max(0, quota - used), used == 0 and 0 or e - now
  end
  function m.save()
    if two_rest(w, (win(0))) then return nil end
    return two_save(w), math.ceil(two_busy_until(w, win) / 1000000)
  end
  return m
end

local function sliding_window(state)
  local quota, every, g, segments = num(), num(), num(), num()
  local ring = segments + 2
  local mod = nowmod(g)
  local head, c
  if state then
    local h, rest = string.match(state, '^([^|]+)|(.*)$')
    head = math.floor((rel(h) + mod) / g + 0.5)
    c = {}
    for v in string.gmatch(rest, '%d+') do c[#c + 1] = tonumber(v) end
  end
  local function seg(t) return math.floor((mod + t) / g) end
  local function first(t) return math.floor((mod + t + 1 - every) / g) end
  local function count_in(k)
    if not c or k > head or head - k >= ring then return 0 end
    return c[head - k + 1]
  end
  local function counted(t)
    if not c then return 0 end
    local f = first(t)
    if f > head then return 0 end
    local sum = 0
    for k = math.max(f, head - ring + 1), head do sum = sum + c[head - k + 1] end
    return sum
  end
  local function oldest_counted(f)
    if not c then return nil end
    for k = math.max(f, head - ring + 1), head do
      if c[head - k + 1] > 0 then return k end
    end
    return nil
  end
  local function add(k, amount)
    if not c then
      c = {}
      for j = 1, ring do c[j] = 0 end
      head = k
    end
    if k > head then
      local gap = math.min(k - head, ring)
      for j = ring, 1, -1 do c[j] = j > gap and c[j - gap] or 0 end
      head = k
    end
    if head - k >= ring then return end
    c[head - k + 1] = c[head - k + 1] + amount
  end
  local m = {}
  function m.earliest(_, cost, from)
    if cost > quota then return NEVER, quota end
    local t = from
    local n = counted(t)
    for _ = 0, ring + 1 do
      if n + cost <= quota then return AT, t end
      local f = first(t)
      n = math.max(0, n - count_in(f))
      t = (f + 1) * g - mod + every - 1
    end
    return AT, t
  end
  function m.reservable(now, at) return seg(at) <= seg(now) + 1 end
  function m.commit(_, cost, at) add(seg(at), cost) end
  function m.debit(now, amount) add(seg(now), amount) end
  function m.release() end
  function m.usage(now)
    local n = counted(now)
    local reset = 0
    if n > 0 then
      local k = oldest_counted(first(now))
      if k then reset = math.max(0, (k + 1) * g - mod + every - 1 - now) end
    end
    return math.max(0, quota - n), reset
  end
  function m.save()
    if not c or first(0) > head then return nil end
    local parts = {}
    for j = 1, ring do parts[j] = string.format('%d', c[j]) end
    local rest_at = (head + 1) * g - mod + every - 1
    return abs(head * g - mod) .. '|' .. table.concat(parts, ','), math.ceil(rest_at / 1000000)
  end
  return m
end

local function tiered(state)
  local tiers = {}
  local total = 0
  for i = 1, num() do
    tiers[i] = { quota = num(), win = calendar() }
    total = total + tiers[i].quota
  end
  local w = {}
  if state then
    local i = 1
    for part in string.gmatch(state, '[^;]+') do
      w[i] = two_load(part, 1)
      i = i + 1
    end
  end
  for i = 1, #tiers do w[i] = w[i] or { -INF, 0, -INF, 0 } end
  local function available_at(t)
    local sum = 0
    for i, tier in ipairs(tiers) do
      sum = sum + math.max(0, tier.quota - two_used(w[i], (tier.win(t))))
    end
    return sum
  end
  local function spill(now, at, amount)
    for i, tier in ipairs(tiers) do
      if amount == 0 then break end
      local s = tier.win(at)
      local take = math.min(math.max(0, tier.quota - two_used(w[i], s)), amount)
      if take > 0 then
        local current = at == now and s or (tier.win(now))
        two_add(w[i], s, current, take)
        amount = amount - take
      end
    end
  end
  local m = {}
  function m.earliest(_, cost, from)
    if cost > total then return NEVER, total end
    if available_at(from) >= cost then return AT, from end
    local candidates = { from }
    for _, tier in ipairs(tiers) do
      local _, e = tier.win(from)
      local _, e2 = tier.win(e)
      candidates[#candidates + 1] = e
      candidates[#candidates + 1] = e2
    end
    table.sort(candidates)
    for _, t in ipairs(candidates) do
      if available_at(t) >= cost then return AT, t end
    end
    return NEVER, total
  end
  function m.reservable(now, at)
    for _, tier in ipairs(tiers) do
      local _, e = tier.win(now)
      local _, e2 = tier.win(e)
      if at >= e2 then return false end
    end
    return true
  end
  function m.commit(now, cost, at) spill(now, at, cost) end
  function m.debit(now, amount) spill(now, now, amount) end
  function m.release() end
  function m.usage(now)
    local remaining, reset = 0, 0
    for i, tier in ipairs(tiers) do
      local s, e = tier.win(now)
      local used = two_used(w[i], s)
      remaining = remaining + math.max(0, tier.quota - used)
      if used > 0 then reset = reset == 0 and e - now or math.min(reset, e - now) end
    end
    return remaining, reset
  end
  function m.save()
    local rest, until_ = true, 0
    local parts = {}
    for i, tier in ipairs(tiers) do
      if not two_rest(w[i], (tier.win(0))) then rest = false end
      until_ = math.max(until_, two_busy_until(w[i], tier.win) or 0)
      parts[i] = two_save(w[i])
    end
    if rest then return nil end
    return table.concat(parts, ';'), math.ceil(until_ / 1000000)
  end
  return m
end

local function concurrency(state)
  local max = num()
  local n = state and tonumber(state) or 0
  local m = {}
  function m.earliest(_, cost, from)
    if cost > max then return NEVER, max end
    if n + cost <= max then return AT, from end
    return ON_RELEASE, 0
  end
  function m.reservable() return true end
  function m.commit(_, cost) n = n + cost end
  function m.debit() end
  function m.release(amount) n = math.max(0, n - amount) end
  function m.usage() return math.max(0, max - n), 0 end
  function m.save()
    if n == 0 then return nil end
    return string.format('%d', n), CONCURRENCY_TTL_MS
  end
  return m
end

local METERS = { g = gcra, f = fixed_window, s = sliding_window, t = tiered, c = concurrency }

---------------------------------------------------------------- slots
-- One decision (or usage, or finish) from ARGV at `pos`, over KEYS after
-- `keybase`: its reply, and how many keys it used.
local function one(keybase)
  local op, time, third, n = field(), field(), field(), num()
  if time == '' then
    if not server_time then
      local t = redis.call('TIME')
      server_time = { tonumber(t[1]), tonumber(t[2]) * 1000 }
    end
    nowS, nowN = server_time[1], server_time[2]
  else
    local s, ns = string.match(time, '^(%d+):(%d+)$')
    nowS, nowN = tonumber(s), tonumber(ns)
  end
  local keys = {}
  local slots = {}
  for i = 1, n do
    keys[i] = KEYS[keybase + i]
    local count = num()
    local next_slot = pos + count
    local alg = field()
    local s = { cost = num(), charge = num(), hold = num(), shadow = field() == '1', settle = num() }
    s.m = METERS[alg](redis.call('GET', keys[i]) or nil)
    pos = next_slot
    slots[i] = s
  end

  local function save(i)
    local text, ttl = slots[i].m.save()
    if text then
      redis.call('SET', keys[i], text, 'PX', math.max(1, ttl) + 1000)
    else
      redis.call('DEL', keys[i])
    end
  end

  if op == 'f' then
    local latency = tonumber(third)
    for i, s in ipairs(slots) do
      if s.settle == 1 then s.m.release(s.charge) save(i)
      elseif s.settle == 2 and latency > 0 then s.m.debit(0, latency) save(i) end
    end
    return { 0 }, n
  end

  ---------------------------------------------------------------- decide
  local function report(kind, a, b, c, own)
    local out = { kind, a, b, c }
    for i, s in ipairs(slots) do
      local remaining, reset = s.m.usage(0)
      local allowed, retry = 0, -1
      local k, t = own[i][1], own[i][2]
      if k == AT and t == 0 then allowed = 1 elseif k == AT then retry = t end
      out[#out + 1] = allowed
      out[#out + 1] = remaining
      out[#out + 1] = reset
      out[#out + 1] = retry
    end
    return out
  end

  local own = {}
  for i, s in ipairs(slots) do own[i] = { s.m.earliest(0, s.cost, 0) } end

  if op == 'u' then return report(0, 0, 0, 0, own), n end

  local may_hold = third == '1'

  for i, s in ipairs(slots) do
    if own[i][1] == NEVER and not s.shadow then
      return report(2, i - 1, s.cost, own[i][2], own), n
    end
  end

  -- The smallest instant at which every enforcing slot admits (core's fixpoint).
  local function fixpoint()
    local t = 0
    for i, s in ipairs(slots) do
      if not s.shadow then
        if own[i][1] ~= AT then return 0, true end
        t = math.max(t, own[i][2])
      end
    end
    if #slots == 1 or t == 0 then return t, false end
    for _ = 1, 64 do
      local moved = false
      for _, s in ipairs(slots) do
        if not s.shadow then
          local k, x = s.m.earliest(0, s.cost, t)
          if k ~= AT then return 0, true end
          if x > t then t, moved = x, true end
        end
      end
      if not moved then return t, false end
    end
    return 0, true
  end

  -- The earliest arrival that would be admitted, at once or held (core's retry_instant).
  local function retry_instant(start)
    local function reservable(x)
      for _, s in ipairs(slots) do
        if not s.shadow and not s.m.reservable(x, start) then return false end
      end
      return true
    end
    local x = 0
    for _ = 1, 64 do
      if x >= start then break end
      local hold, nxt = INF, start
      for _, s in ipairs(slots) do
        if not s.shadow then
          local k, t = s.m.earliest(x, s.cost, x)
          local h = may_hold and s.hold or 0
          if k == AT and t == x then
          elseif k == AT then hold, nxt = math.min(hold, h), math.min(nxt, t)
          else hold = math.min(hold, h) end
        end
      end
      local within = start - x <= hold
      if within and reservable(x) then return x end
      if not within then
        nxt = math.min(nxt, start - hold)
      else
        local lo, hi = x, nxt
        while hi - lo > 1 do
          local mid = lo + math.floor((hi - lo) / 2)
          if reservable(mid) then hi = mid else lo = mid end
        end
        nxt = hi
      end
      x = math.max(nxt, x + 1)
    end
    return start
  end

  local start, blocked = fixpoint()
  local hold, any = INF, false
  for i, s in ipairs(slots) do
    if not s.shadow and not (own[i][1] == AT and own[i][2] == 0) then
      hold, any = math.min(hold, may_hold and s.hold or 0), true
    end
  end
  if not any then hold = 0 end
  local fits = not blocked and start == 0
  if not blocked and start > 0 and start <= hold then
    fits = true
    for _, s in ipairs(slots) do
      if not s.shadow and not s.m.reservable(0, start) then fits = false end
    end
  end

  if not fits then
    local limit, rank = 0, -1
    for i, s in ipairs(slots) do
      if not s.shadow then
        local r = own[i][1] == AT and math.max(0, own[i][2]) or INF
        if r > rank then limit, rank = i - 1, r end
      end
    end
    local retry = -1
    if not blocked then retry = retry_instant(start) end
    return report(1, limit, retry, 0, own), n
  end

  local out = { 0, start, 0, 0 }
  for i, s in ipairs(slots) do
    local allowed, retry = 1, -1
    if s.shadow then
      local k, t = s.m.earliest(0, s.cost, start)
      if k == AT and t == start and s.m.reservable(0, start) then
        s.m.commit(0, s.charge, start)
      elseif k == AT then
        allowed, retry = 0, t
      else
        allowed = 0
      end
    else
      s.m.commit(0, s.charge, start)
    end
    save(i)
    local remaining, reset = s.m.usage(0)
    out[#out + 1] = allowed
    out[#out + 1] = remaining
    out[#out + 1] = reset
    out[#out + 1] = retry
  end
  return out, n
end

local out, keybase = {}, 0
while pos <= #ARGV do
  local reply, n = one(keybase)
  keybase = keybase + n
  for _, v in ipairs(reply) do out[#out + 1] = v end
end
return out
