-- tollgate: one decision over every limit of a request, in one round trip.
--
-- Why Lua: the decision reads every limit's state, decides all-or-nothing and
-- writes the new states; as one script it is atomic on the Redis server, so
-- N processes sharing these keys never over-admit (a client that reads, then
-- writes, races: two clients read the same count and both admit). The
-- algorithms are tollgate-core's (decide.rs, algo/*.rs), ported line by line;
-- the conformance suite (crates/store/tests/conformance.rs) runs against both.
--
-- Loaded once as a Redis Function library (FUNCTION LOAD, then FCALL, Redis
-- >= 7 and Valkey): its functions, the limit specs it has parsed and the
-- numbers of the states it wrote stay in the server between calls (caches
-- of pure functions of their text, so any node's library reads any node's
-- keys). On a server without functions the same source runs as an EVALSHA
-- script (the last lines tell the two apart), its caches then per call.
--
-- Time: Redis TIME (one clock for the whole fleet), or a caller's instant for
-- tests with a fake clock. Every instant here is nanoseconds RELATIVE to that
-- now, so Lua's doubles stay exact (|t| < 2^53 ns, about 104 days; the Rust
-- side refuses limits that would need more).
--
-- State: numbers separated by "|", the first the whole second B it was
-- written at, every instant after it in ns from B (so it stays small and
-- exact, and costs no "S:N" parsing):
--   g  B|tat|tat_frac|amount|period       (the rate it was written for)
--   f  no state of its own: a counter per window under "KEY|START" (see FIXED)
--   t  B then per pool: start|used|start|used (used 0: nothing), then each
--      pool's window length in ns (the tiers it was written for, then any
--      pool of another node's definition that this one does not know)
--   s  B|head_start|count|count|..       (newest segment first)
--   c  n                                  (in flight)
-- A bucket or tiered state written for other parameters (a reload changed
-- the limit's rate or tiers: its key is named by what its counts mean, see
-- tollgate_core::carry) is carried into the new ones when it is read, as
-- the memory store does at the reload, and written back.
-- A key's expiry is the whole second after its state comes to rest, plus a
-- second; a write that leaves that second unchanged keeps the TTL (SET
-- KEEPTTL costs half a SET PX).
--
-- One call makes one or more decisions, in order, each all-or-nothing over
-- its own limits, as if each were a call of its own: under load the store
-- sends the decisions queued meanwhile together (fewer calls than
-- decisions; each decision still takes exactly one round trip).
--
-- KEYS     the states of every decision's slots, decision after decision:
--          {prefix}:{namespace}:{limit}:{fingerprint}:{variant}:{key}
-- ARGV     per decision:
--   head   op and slot count n, e.g. "d1", then "@SECONDS:NANOS" for a
--          caller's instant (none: Redis TIME, read once per call). op is
--          "d" decide, "h" decide and the request may be held (reserve a
--          future instant), "u" usage only (writes nothing), "f" finish:
--          debit latency (latency limits) or release (concurrency), "l"
--          and "m" decide as "d" and "h" taking leases (see `lease`), "p"
--          takes slices ahead of need (see `prefetch`), "r" gives back
--          slices' unused units (see `give_back`)
--   (f)    for "f" only: the latency to debit, in microseconds
--   then per slot, in KEYS order, two values: spec, and "cost" (the charge
--   is the same) or "cost/charge"; for "l", "m", "p" and "r" a third, the
--   lease argument: "-", or "want" then ":units:markS:markN" per refund.
--   spec   the limit's static fields, comma-separated (parsed once and kept):
--          algorithm, hold (ns), shadow (0/1), latency (0/1: debited at finish),
--          then the algorithm's parameters:
--   g  token/leaky bucket (GCRA): capacity amount period whole rem tau_ns tau_frac
--      since ("S:N" when a reload carried the limit's counts into this rate,
--      or "-")
--   f  fixed window: quota CALENDAR
--   s  sliding window: quota every segment segments
--   t  tiered: tiers, then per tier: quota CALENDAR
--   c  concurrency: max
--   CALENDAR is "F every offset" (a fixed UTC offset, ns, 0 <= offset < every)
--   or "N every count b1 .. bcount" (window boundaries "S:N" of a zone with
--   DST, computed by the caller around its clock; extrapolated by `every`
--   beyond).
-- Returns the decisions' replies one after the other; for "d", "h" and "u":
--   {kind, a, b, c, then per slot: allowed, remaining, reset, retry_after}
--   kind 0 admit (a = delay ns); 1 deny (a = slot, 0-based; b = retry_after ns or -1 when only a
--   release can make room); 2 never (a = slot, b = cost, c = capacity). retry_after -1 = none.
--   kind 3 is the short form of an admission at once where every slot
--   admits: {3, then per slot: remaining, reset}.
-- Returns for "l" and "m": the decision's reply, then per slot four values:
--   units lent, the slice's mark (whole second, ns), until (ns from now).
--   For "p", those four values per slot alone.
-- Returns for "f" and "r": {0}.
-- Keys expire on their own once their state is at rest (a fresh state would
-- decide the same); an in-flight count lives CONCURRENCY_TTL past its last change.

local BIL = 1000000000
local CONCURRENCY_TTL_MS = 3600000
local AT, ON_RELEASE, NEVER = 0, 1, 2
-- Redis 7.0 loads a library with no standard globals in sight: the run's
-- first call binds these (see `bind`).
local INF, floor, ceil, max, min, match, format, gmatch, concat, sort, spread
-- Small whole numbers by their text: argument costs without tonumber's strtod.
local SMALL = {}
local function bind(library)
  INF, floor, ceil, max, min = math.huge, math.floor, math.ceil, math.max, math.min
  match, format, gmatch = string.match, string.format, string.gmatch
  concat, sort, spread = table.concat, table.sort, unpack
  if library then
    for i = 0, 64 do SMALL[tostring(i)] = i end
  end
end

-- now, for the decision being made (set per decision); Redis TIME is read
-- once per call.
local nowS, nowN

-- "S:N" (a window boundary the caller sent) -> ns relative to now.
local function rel(text)
  local sec, n = match(text, '^(-?%d+):(%d+)$')
  return (tonumber(sec) - nowS) * BIL + (tonumber(n) - nowN)
end

-- A stored state's base second -> the ns to add to its instants to make them
-- relative to now; a relative instant is stored as r + nowN (base nowS).
local function since(base) return (base - nowS) * BIL - nowN end

-- now (absolute) modulo g, exactly: g is whole seconds, or below 9e14 ns.
local function nowmod(g)
  if g % BIL == 0 then
    return (nowS % (g / BIL)) * BIL + nowN
  end
  local x = nowS % g
  for _ = 1, 9 do x = (x * 10) % g end
  return (x + nowN) % g
end

---------------------------------------------------------------- calendars
-- A calendar (from a spec): { fixed = true, every, offset } or { every,
-- bounds = { "S:N", .. } }. Per decision it is seen from now: `view` gives
-- the phase of a fixed one, or its boundaries relative to now; `win(cal, v, t)`
-- the start and end of the window holding t.

local function view(cal)
  if cal.fixed then return (nowmod(cal.every) + cal.offset) % cal.every end
  local b = {}
  for i, text in ipairs(cal.bounds) do b[i] = rel(text) end
  return b
end

local function win(cal, v, t)
  local every = cal.every
  if cal.fixed then
    local s = t - (v + t) % every
    return s, s + every
  end
  local n = #v
  if t < v[1] then
    local s = v[1] - ceil((v[1] - t) / every) * every
    return s, s + every
  end
  if t >= v[n] then
    local s = v[n] + floor((t - v[n]) / every) * every
    return s, s + every
  end
  local lo, hi = 1, n
  while hi - lo > 1 do
    local mid = floor((lo + hi) / 2)
    if v[mid] <= t then lo = mid else hi = mid end
  end
  return v[lo], v[hi]
end

local function win_start(cal, v, t)
  local s = win(cal, v, t)
  return s
end

-- Two window counters {start, used, start, used}: the current window and,
-- for reservations, the next (core's TwoWindows); used 0 is an empty slot.
local function two_new() return { -INF, 0, -INF, 0 } end
-- A window as loaded: an empty one has no start.
local function two_set(w, i, shift, start, used)
  if used > 0 then w[i], w[i + 1] = shift + start, used end
end
-- Both windows into a state `a` from index i on, an empty one as 0, 0.
local function two_put(a, i, w)
  a[i], a[i + 1] = w[2] > 0 and w[1] + nowN or 0, w[2]
  a[i + 2], a[i + 3] = w[4] > 0 and w[3] + nowN or 0, w[4]
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
local function two_busy_until(w, cal, v)
  local last
  for j = 1, 3, 2 do
    if w[j + 1] > 0 then
      local _, e = win(cal, v, w[j])
      if not last or e > last then last = e end
    end
  end
  return last
end

---------------------------------------------------------------- meters
-- Each algorithm is a table of plain functions over a slot `s` (its spec
-- `s.p`, and the state `load` parsed into it); every instant is relative to
-- now (0):
--   load(s, state or nil); earliest(s, cost, from) -> kind, value;
--   reservable(s, x, at); commit(s, cost, at); debit(s, amount);
--   release(s, amount); usage(s) -> remaining, reset;
--   rest(s) -> the instant the state comes to rest, or nil if it is;
--   save(s) -> state or nil (at rest: delete).
-- A state is an array of whole numbers (see "State" above); `load` copies
-- what it needs out of it, `save` returns a new one. FIXED keeps counters
-- instead: `load(s)` reads nothing and `persist(s)` writes its counts, in
-- place of rest and save. `fast(s, out, may_hold)`, where there is one,
-- decides a request of that limit alone, or returns false.
-- `parse(fields, i)` reads the algorithm's parameters from a spec's fields.

local function yes() return true end
local function nothing() end

-- GCRA instants are exact: whole ns plus a fraction in 1/amount ns.
local function g_add(p, an, af, bn, bf)
  local f = af + bf
  if f >= p.amount then return an + bn + 1, f - p.amount end
  return an + bn, f
end
local function g_span(p, cost)
  if cost == 1 then return p.whole, p.rem end
  local r = cost * p.rem
  return cost * p.whole + floor(r / p.amount), r % p.amount
end
local function g_le(an, af, bn, bf) return an < bn or (an == bn and af <= bf) end
-- a - b rounded up to a whole ns (an instant minus a span: may be negative)
local function g_diff_ceil(p, an, af, bn, bf)
  local ns, f = an - bn, af - bf
  if f < 0 then ns, f = ns - 1, f + p.amount end
  if f > 0 then ns = ns + 1 end
  return ns
end

local GCRA = { reservable = yes, release = nothing }
function GCRA.parse(f, i)
  return { cap = tonumber(f[i]), amount = tonumber(f[i + 1]), period = tonumber(f[i + 2]),
    whole = tonumber(f[i + 3]), rem = tonumber(f[i + 4]), taun = tonumber(f[i + 5]),
    tauf = tonumber(f[i + 6]), since = f[i + 7] ~= '-' and f[i + 7] }
end
-- A bucket written for another rate: the units it owed at instant c (when
-- the reload here carried the limit into this rate, or the state's own
-- second if it was written later), owed at this one from then on
-- (algo::gcra::carried: the same doubles, rounded up to a whole ns).
local function g_carry(s, amount, period, c)
  local p = s.p
  if g_le(s.tn, s.tf, c, 0) then
    s.tn, s.tf = -INF, 0
  else
    local debt = (s.tn - c) * amount + s.tf
    s.tn, s.tf = c + ceil(debt / period * p.period / p.amount), 0
  end
  s.dirty = true
end
function GCRA.load(s, a)
  if a then
    local written = since(a[1])
    s.tn, s.tf = written + a[2], a[3]
    local p = s.p
    if a[4] ~= p.amount or a[5] ~= p.period then
      local c = written
      if p.since then c = max(c, rel(p.since)) end
      g_carry(s, a[4] or p.amount, a[5] or p.period, min(c, 0))
    end
  else
    s.tn, s.tf = -INF, 0
  end
end
function GCRA.rest(s)
  if g_le(s.tn, s.tf, 0, 0) then return nil end
  return s.tf > 0 and s.tn + 1 or s.tn
end
function GCRA.earliest(s, cost, from)
  local p = s.p
  if cost > p.cap then return NEVER, p.cap end
  local sn, sf = g_span(p, cost)
  local dn, df = g_add(p, s.tn, s.tf, sn, sf)
  return AT, max(from, g_diff_ceil(p, dn, df, p.taun, p.tauf))
end
function GCRA.commit(s, cost, at)
  local p = s.p
  local bn, bf = s.tn, s.tf
  if g_le(bn, bf, at, 0) then bn, bf = at, 0 end
  local sn, sf = g_span(p, cost)
  s.tn, s.tf = g_add(p, bn, bf, sn, sf)
end
function GCRA.debit(s, amount) GCRA.commit(s, amount, 0) end
function GCRA.usage(s)
  local p = s.p
  local tn, tf = s.tn, s.tf
  if g_le(tn, tf, 0, 0) then return p.cap, 0 end
  local fn, ff = g_add(p, 0, 0, p.taun, p.tauf)
  if g_le(fn, ff, tn, tf) then
    local nn, nf = g_add(p, tn, tf, p.whole, p.rem)
    return 0, max(0, g_diff_ceil(p, nn, nf, fn, ff))
  end
  local slack = (fn - tn) * p.amount + (ff - tf)
  local remaining = floor(slack / p.period)
  return remaining, ceil(((remaining + 1) * p.period - slack) / p.amount)
end
function GCRA.save(s)
  if g_le(s.tn, s.tf, 0, 0) then return nil end
  local p = s.p
  return { nowS, s.tn + nowN, s.tf, p.amount, p.period }
end
-- Leases (see `lease` below). A slice's units sit on the bucket's timeline
-- just before its mark, the TAT its grant left. Units whose place there is
-- still ahead of now are given back exactly (the TAT moves back by their
-- span: as if they had never been taken); those behind now have refilled
-- anyway and are not given back. A slice is used for its ttl: its units
-- were taken before any of them is used, so in any span admissions exceed
-- the bucket's by at most what slices held at the span's start.
function GCRA.refund(s, units, mark)
  local p = s.p
  if mark <= 0 then return end
  local r = min(units, floor(mark * p.amount / p.period))
  if r <= 0 then return end
  local sn, sf = g_span(p, r)
  local tn, tf = s.tn - sn, s.tf - sf
  if tf < 0 then tn, tf = tn - 1, tf + p.amount end
  s.tn, s.tf, s.dirty = tn, tf, true
end
function GCRA.grant(s) return s.tn, -1 end

-- A calendar from a spec's fields at i: the calendar and the next index.
local function parse_calendar(f, i)
  local every = tonumber(f[i + 1])
  if f[i] == 'F' then
    return { fixed = true, every = every, offset = tonumber(f[i + 2]) }, i + 3
  end
  local count = tonumber(f[i + 2])
  local bounds = {}
  for j = 1, count do bounds[j] = f[i + 2 + j] end
  return { every = every, bounds = bounds }, i + 3 + count
end

-- A fixed window keeps one counter per window instead of a state: the key
-- "KEY|START" (START the window's start, whole seconds or "S.N"), an integer
-- that INCRBY adds to and that expires a second after its window ends. The
-- counters a decision reads are cached in `s.counts` by relative start, and
-- its commits gathered in `s.adds` until `persist`. Only the current window
-- and a reserved next one are ever counted (as core's TwoWindows).
local FIXED = { release = nothing }
function FIXED.parse(f, i)
  return { quota = tonumber(f[i]), cal = (parse_calendar(f, i + 1)) }
end
function FIXED.load(s)
  s.v = view(s.p.cal)
end
-- The counter's key of the window starting at relative `st` (the spec keeps
-- the last start's text: a window's start is formatted once).
local function fw_key(s, st)
  local total = nowN + st
  local sec = floor(total / BIL)
  local S, N = nowS + sec, total - sec * BIL
  local cal = s.p.cal
  if cal.kS ~= S or cal.kN ~= N then
    cal.kS, cal.kN = S, N
    cal.kid = N == 0 and format('%d', S) or format('%d.%09d', S, N)
  end
  return s.key .. '|' .. cal.kid
end
local function fw_used(s, st)
  local counts = s.counts
  if not counts then
    counts = {}
    s.counts = counts
  end
  local c = counts[st]
  if c then return c end
  local v = redis.call('GET', fw_key(s, st))
  c = v and (SMALL[v] or tonumber(v)) or 0
  counts[st] = c
  return c
end
function FIXED.earliest(s, cost, from)
  local quota, cal, v = s.p.quota, s.p.cal, s.v
  if cost > quota then return NEVER, quota end
  local st, e = win(cal, v, from)
  for _ = 1, 3 do
    if fw_used(s, st) + cost <= quota then return AT, max(from, st) end
    st, e = win(cal, v, e)
  end
  return AT, st
end
function FIXED.reservable(s, x, at)
  local _, e = win(s.p.cal, s.v, x)
  local _, e2 = win(s.p.cal, s.v, e)
  return at < e2
end
function FIXED.commit(s, cost, at)
  local st = win_start(s.p.cal, s.v, at)
  -- fw_used first: it makes s.counts (a completion's debit comes here
  -- with none; Lua may evaluate `s.counts` before the right-hand side)
  local used = fw_used(s, st)
  s.counts[st] = used + cost
  local adds = s.adds or {}
  adds[st] = (adds[st] or 0) + cost
  s.adds = adds
end
function FIXED.debit(s, amount) FIXED.commit(s, amount, 0) end
function FIXED.usage(s)
  local st, e = win(s.p.cal, s.v, 0)
  local used = fw_used(s, st)
  return max(0, s.p.quota - used), used == 0 and 0 or e
end
-- A new counter gets its TTL: its window's end plus a second.
local function fw_add(s, st, amount)
  local key = fw_key(s, st)
  local used = redis.call('INCRBY', key, amount)
  if used == amount then
    local _, e = win(s.p.cal, s.v, st)
    redis.call('PEXPIRE', key, ceil(e / 1000000) + 1000)
  end
  return used
end
function FIXED.persist(s)
  if not s.adds then return end
  for st, amount in pairs(s.adds) do
    if amount > 0 then fw_add(s, st, amount) end
  end
end
-- An admission at once in one INCRBY: true if it was (its reply in `out`);
-- else nothing has changed and the count is cached for the general path.
function FIXED.fast(s, out)
  local cost, quota = s.cost, s.p.quota
  if cost ~= s.charge or cost <= 0 or cost > quota then return false end
  local st, e = win(s.p.cal, s.v, 0)
  local used = fw_add(s, st, cost)
  if used > quota then
    -- used - cost > quota - cost >= 0: the counter stays, without this
    s.counts = { [st] = redis.call('DECRBY', fw_key(s, st), cost) }
    return false
  end
  local n = #out
  out[n + 1], out[n + 2], out[n + 3] = 3, quota - used, e
  return true
end

-- A slice of a window is used within that window only, and what it did not
-- use goes back to that window's counter while it is the current one.
function FIXED.refund(s, units, mark)
  local st = win_start(s.p.cal, s.v, 0)
  if win_start(s.p.cal, s.v, mark) ~= st then return end
  local r = min(units, fw_used(s, st))
  if r <= 0 then return end
  s.counts[st] = redis.call('DECRBY', fw_key(s, st), r)
end
function FIXED.grant(s)
  local _, e = win(s.p.cal, s.v, 0)
  return 0, e
end

local SLIDING = { release = nothing }
function SLIDING.parse(f, i)
  local segments = tonumber(f[i + 3])
  return { quota = tonumber(f[i]), every = tonumber(f[i + 1]), g = tonumber(f[i + 2]),
    ring = segments + 2 }
end
function SLIDING.load(s, a)
  local p = s.p
  s.mod = nowmod(p.g)
  s.head, s.c = nil, nil
  if a then
    s.head = floor((since(a[1]) + a[2] + s.mod) / p.g + 0.5)
    local c = {}
    for j = 1, p.ring do c[j] = a[j + 2] or 0 end
    s.c = c
  end
end
local function sw_seg(s, t) return floor((s.mod + t) / s.p.g) end
local function sw_first(s, t) return floor((s.mod + t + 1 - s.p.every) / s.p.g) end
local function sw_count_in(s, k)
  if not s.c or k > s.head or s.head - k >= s.p.ring then return 0 end
  return s.c[s.head - k + 1]
end
local function sw_counted(s, t)
  local c, head = s.c, s.head
  if not c then return 0 end
  local f = sw_first(s, t)
  if f > head then return 0 end
  local sum = 0
  for k = max(f, head - s.p.ring + 1), head do sum = sum + c[head - k + 1] end
  return sum
end
local function sw_oldest_counted(s, f)
  local c, head = s.c, s.head
  if not c then return nil end
  for k = max(f, head - s.p.ring + 1), head do
    if c[head - k + 1] > 0 then return k end
  end
  return nil
end
local function sw_add(s, k, amount)
  local ring = s.p.ring
  if not s.c then
    local c = {}
    for j = 1, ring do c[j] = 0 end
    s.c, s.head = c, k
  end
  local c = s.c
  if k > s.head then
    local gap = min(k - s.head, ring)
    for j = ring, 1, -1 do c[j] = j > gap and c[j - gap] or 0 end
    s.head = k
  end
  if s.head - k >= ring then return end
  c[s.head - k + 1] = c[s.head - k + 1] + amount
end
function SLIDING.earliest(s, cost, from)
  local p = s.p
  if cost > p.quota then return NEVER, p.quota end
  local t = from
  local n = sw_counted(s, t)
  for _ = 0, p.ring + 1 do
    if n + cost <= p.quota then return AT, t end
    local f = sw_first(s, t)
    n = max(0, n - sw_count_in(s, f))
    t = (f + 1) * p.g - s.mod + p.every - 1
  end
  return AT, t
end
function SLIDING.reservable(s, x, at) return sw_seg(s, at) <= sw_seg(s, x) + 1 end
function SLIDING.commit(s, cost, at) sw_add(s, sw_seg(s, at), cost) end
function SLIDING.debit(s, amount) sw_add(s, sw_seg(s, 0), amount) end
function SLIDING.usage(s)
  local p = s.p
  local n = sw_counted(s, 0)
  local reset = 0
  if n > 0 then
    local k = sw_oldest_counted(s, sw_first(s, 0))
    if k then reset = max(0, (k + 1) * p.g - s.mod + p.every - 1) end
  end
  return max(0, p.quota - n), reset
end
function SLIDING.rest(s)
  if not s.c or sw_first(s, 0) > s.head then return nil end
  return (s.head + 1) * s.p.g - s.mod + s.p.every - 1
end
function SLIDING.save(s)
  local p, c = s.p, s.c
  if not c or sw_first(s, 0) > s.head then return nil end
  local a = { nowS, s.head * p.g - s.mod + nowN }
  for j = 1, p.ring do a[j + 2] = c[j] end
  return a
end

-- A slice's units go back to the segment they were counted in, while it is
-- still counted; a slice is used until that segment leaves the window.
function SLIDING.refund(s, units, mark)
  local k, c = sw_seg(s, mark), s.c
  if not c or k > s.head or s.head - k >= s.p.ring or k < sw_first(s, 0) then return end
  local i = s.head - k + 1
  local r = min(units, c[i])
  if r <= 0 then return end
  c[i], s.dirty = c[i] - r, true
end
function SLIDING.grant(s)
  local p = s.p
  return 0, (sw_seg(s, 0) + 1) * p.g - s.mod + p.every - 1
end

local TIERED = { release = nothing }
function TIERED.parse(f, i)
  local tiers, total = {}, 0
  local j = i + 1
  for k = 1, tonumber(f[i]) do
    local quota = tonumber(f[j])
    local cal
    cal, j = parse_calendar(f, j + 1)
    tiers[k] = { quota = quota, cal = cal }
    total = total + quota
  end
  return { tiers = tiers, total = total }
end
-- Stored pool j of state `a` (of `pools` pools), as windows relative to now.
local function t_pool(a, j, shift)
  local w, i = two_new(), 4 * j - 2
  two_set(w, 1, shift, a[i], a[i + 1])
  two_set(w, 3, shift, a[i + 2], a[i + 3])
  return w
end
-- Until when a pool of another definition (window length `every`) is
-- busy: a window length, and an hour for a day of DST, past the start of
-- its latest window with a count (relative ns; nil or <= 0: at rest).
local function t_foreign_until(w, every)
  local last
  for j = 1, 3, 2 do
    if w[j + 1] > 0 then last = max(last or -INF, w[j] + every + 3600 * BIL) end
  end
  return last
end
-- Pools are matched to tiers by window length: a state written for other
-- tiers (a reload changed them, here or on another node) keeps each
-- matching pool's use, an added pool starts full, and a pool this
-- definition does not know is kept (`s.x`) while it is busy, for the nodes
-- that know it, so a fleet in the middle of a change never resets a pool.
function TIERED.load(s, a)
  local tiers = s.p.tiers
  local w, v, x = {}, {}, {}
  local pools = a and (#a - 1) / 5 or 0
  local shift = a and since(a[1])
  local known = {}
  for k, tier in ipairs(tiers) do
    local j = pools == #tiers and a[4 * pools + 1 + k] == tier.cal.every and k
    if a and not j then
      s.dirty = true
      for i = 1, pools do
        if a[4 * pools + 1 + i] == tier.cal.every then j = i end
      end
    end
    w[k] = j and t_pool(a, j, shift) or two_new()
    if j then known[j] = true end
    v[k] = view(tier.cal)
  end
  for j = 1, pools do
    if not known[j] then
      local pool, every = t_pool(a, j, shift), a[4 * pools + 1 + j]
      local busy = t_foreign_until(pool, every)
      if busy and busy > 0 then x[#x + 1] = { every = every, w = pool } end
    end
  end
  s.w, s.v, s.x = w, v, x
end
local function t_available_at(s, t)
  local sum = 0
  for k, tier in ipairs(s.p.tiers) do
    sum = sum + max(0, tier.quota - two_used(s.w[k], win_start(tier.cal, s.v[k], t)))
  end
  return sum
end
local function t_spill(s, at, amount)
  for k, tier in ipairs(s.p.tiers) do
    if amount == 0 then break end
    local st = win_start(tier.cal, s.v[k], at)
    local take = min(max(0, tier.quota - two_used(s.w[k], st)), amount)
    if take > 0 then
      local current = at == 0 and st or win_start(tier.cal, s.v[k], 0)
      two_add(s.w[k], st, current, take)
      amount = amount - take
    end
  end
end
function TIERED.earliest(s, cost, from)
  local total = s.p.total
  if cost > total then return NEVER, total end
  if t_available_at(s, from) >= cost then return AT, from end
  local candidates = { from }
  for k, tier in ipairs(s.p.tiers) do
    local _, e = win(tier.cal, s.v[k], from)
    local _, e2 = win(tier.cal, s.v[k], e)
    candidates[#candidates + 1] = e
    candidates[#candidates + 1] = e2
  end
  sort(candidates)
  for _, t in ipairs(candidates) do
    if t_available_at(s, t) >= cost then return AT, t end
  end
  return NEVER, total
end
function TIERED.reservable(s, x, at)
  for k, tier in ipairs(s.p.tiers) do
    local _, e = win(tier.cal, s.v[k], x)
    local _, e2 = win(tier.cal, s.v[k], e)
    if at >= e2 then return false end
  end
  return true
end
function TIERED.commit(s, cost, at) t_spill(s, at, cost) end
function TIERED.debit(s, amount) t_spill(s, 0, amount) end
function TIERED.usage(s)
  local remaining, reset = 0, 0
  for k, tier in ipairs(s.p.tiers) do
    local st, e = win(tier.cal, s.v[k], 0)
    local used = two_used(s.w[k], st)
    remaining = remaining + max(0, tier.quota - used)
    if used > 0 then reset = reset == 0 and e or min(reset, e) end
  end
  return remaining, reset
end
function TIERED.rest(s)
  local rest, until_ = true, 0
  for k, tier in ipairs(s.p.tiers) do
    local w, v = s.w[k], s.v[k]
    if not two_rest(w, win_start(tier.cal, v, 0)) then rest = false end
    until_ = max(until_, two_busy_until(w, tier.cal, v) or 0)
  end
  for _, pool in ipairs(s.x) do
    rest, until_ = false, max(until_, t_foreign_until(pool.w, pool.every))
  end
  if rest then return nil end
  return until_
end
function TIERED.save(s)
  if not TIERED.rest(s) then return nil end
  local a = { nowS }
  local tiers, x = s.p.tiers, s.x
  local pools = #tiers + #x
  for k, w in ipairs(s.w) do two_put(a, 4 * k - 2, w) end
  for k, pool in ipairs(x) do two_put(a, 4 * (#tiers + k) - 2, pool.w) end
  for k, tier in ipairs(tiers) do a[4 * pools + 1 + k] = tier.cal.every end
  for k, pool in ipairs(x) do a[4 * pools + 1 + #tiers + k] = pool.every end
  return a
end

local CONCURRENCY = { reservable = yes, debit = nothing }
function CONCURRENCY.parse(f, i) return { max = tonumber(f[i]) } end
function CONCURRENCY.load(s, a) s.n = a and a[1] or 0 end
function CONCURRENCY.earliest(s, cost, from)
  local m = s.p.max
  if cost > m then return NEVER, m end
  if s.n + cost <= m then return AT, from end
  return ON_RELEASE, 0
end
function CONCURRENCY.commit(s, cost) s.n = s.n + cost end
function CONCURRENCY.release(s, amount) s.n = max(0, s.n - amount) end
function CONCURRENCY.usage(s) return max(0, s.p.max - s.n), 0 end
-- An in-flight count lives CONCURRENCY_TTL past its last change: never at
-- rest by the clock, so every write sets its TTL.
function CONCURRENCY.rest() return nil end
function CONCURRENCY.save(s)
  if s.n == 0 then return nil end
  return { s.n }
end

local ALGORITHMS = { g = GCRA, f = FIXED, s = SLIDING, t = TIERED, c = CONCURRENCY }

---------------------------------------------------------------- specs
-- A limit's spec, parsed once per distinct text and kept while the library
-- is loaded (a bounded cache: specs of zones with DST change once a window).
local SPECS, spec_count = {}, 0
local function spec(text)
  local sp = SPECS[text]
  if sp then return sp end
  local f = {}
  for v in gmatch(text, '[^,]+') do f[#f + 1] = v end
  local alg = ALGORITHMS[f[1]]
  if not alg then error('tollgate: unknown algorithm in spec ' .. text) end
  sp = alg.parse(f, 5)
  sp.alg, sp.hold, sp.shadow, sp.latency = alg, tonumber(f[2]), f[3] == '1', f[4] == '1'
  if spec_count >= 4096 then SPECS, spec_count = {}, 0 end
  SPECS[text], spec_count = sp, spec_count + 1
  return sp
end

---------------------------------------------------------------- decide

-- The whole second (absolute) after a relative instant.
local function second_after(r) return nowS + ceil((nowN + r) / BIL) end

-- States as text: their numbers joined by "|". The numbers of the texts
-- this library wrote (or read) are kept, so reading a state back costs no
-- parsing (strtod is most of a decision's cost otherwise): a bounded memo
-- of a pure function, whoever wrote the key.
local NUMBERS, numbers_count = {}, 0
local FORMATS = {}
local function remember(text, a)
  if numbers_count >= 20000 then NUMBERS, numbers_count = {}, 0 end
  NUMBERS[text], numbers_count = a, numbers_count + 1
end
local function encode(a)
  local n = #a
  local f = FORMATS[n]
  if not f then
    f = string.rep('%d|', n - 1) .. '%d'
    FORMATS[n] = f
  end
  local text = format(f, spread(a))
  remember(text, a)
  return text
end
local function decode(text)
  local a = NUMBERS[text]
  if a then return a end
  a = {}
  for x in gmatch(text, '[^|]+') do a[#a + 1] = tonumber(x) end
  remember(text, a)
  return a
end

-- Set a slot's key to state `a`, with a TTL a second past the whole second
-- `expiry` (nil: CONCURRENCY_TTL from now), kept as it is when that second
-- has not moved since the load (see `load`).
local function write(s, a, expiry)
  s.dirty = false
  local text = encode(a)
  if expiry and s.expiry and expiry <= s.expiry then
    redis.call('SET', s.key, text, 'KEEPTTL')
    return
  end
  local ttl = expiry and (expiry - nowS) * 1000 - floor(nowN / 1000000) or CONCURRENCY_TTL_MS
  redis.call('SET', s.key, text, 'PX', ttl + 1000)
end

-- Write a slot's state back: delete it at rest, else set it.
local function save(s)
  local alg = s.p.alg
  if alg.persist then return alg.persist(s) end
  local a = alg.save(s)
  if not a then
    s.dirty = false
    if s.stored then redis.call('DEL', s.key) end
  elseif alg == CONCURRENCY then
    write(s, a, nil)
  else
    write(s, a, second_after(alg.rest(s)))
  end
end

-- A slot's state from its key; `expiry` is the second its TTL was set for
-- (every write keeps TTL >= the second after the state's rest instant).
local function load(s)
  local alg = s.p.alg
  if alg.persist then return alg.load(s) end
  local text = redis.call('GET', s.key)
  if text then
    s.stored = true
    alg.load(s, decode(text))
    -- (a state a reload carried is dirty, its rest moved: its key's TTL was
    -- set for the rest before, so the write sets a new one, not KEEPTTL)
    local rest = alg.rest(s)
    if rest and not s.dirty then s.expiry = second_after(rest) end
  else
    alg.load(s, nil)
  end
end

-- One token bucket on its own, its rate a whole number of ns per unit (no
-- fractions anywhere): the whole decision in a few lines, the same as the
-- general path below makes it (admit now, reserve within the hold, or deny
-- with retry_after = start - hold). False when it does not apply. (Defined
-- here, after `write`, which it shares with `save`.)
function GCRA.fast(s, out, may_hold)
  local p, cost = s.p, s.cost
  if cost ~= s.charge or cost <= 0 or cost > p.cap or p.rem ~= 0 or p.tauf ~= 0 or s.tf ~= 0
    or p.whole <= 0 then
    return false
  end
  local span, taun = cost * p.whole, p.taun
  local tat = s.tn
  local start = max(0, tat + span - taun)
  local hold = may_hold and p.hold or 0
  local n = #out
  if start > hold then
    out[n + 1], out[n + 2], out[n + 3], out[n + 4] = 1, 0, start - hold, 0
    out[n + 5] = 0
    out[n + 6], out[n + 7] = GCRA.usage(s)
    out[n + 8] = start
    return true
  end
  tat = max(tat, start) + span
  s.tn = tat
  write(s, { nowS, tat + nowN, 0, p.amount, p.period }, second_after(tat))
  -- GCRA.usage without fractions (tat > 0 here)
  local remaining, reset = 0, max(0, tat + p.whole - taun)
  if tat < taun then
    local slack = (taun - tat) * p.amount
    remaining = floor(slack / p.period)
    reset = ceil(((remaining + 1) * p.period - slack) / p.amount)
  end
  if start == 0 then
    out[n + 1], out[n + 2], out[n + 3] = 3, remaining, reset
  else
    out[n + 1], out[n + 2], out[n + 3], out[n + 4] = 0, start, 0, 0
    out[n + 5], out[n + 6], out[n + 7], out[n + 8] = 1, remaining, reset, -1
  end
  return true
end

local function earliest(s, from) return s.p.alg.earliest(s, s.cost, from) end
local function reservable(s, x, at) return s.p.alg.reservable(s, x, at) end

-- Every slot's outcome after a verdict, appended to `out`.
local function report(out, slots, own)
  for i, s in ipairs(slots) do
    local remaining, reset = s.p.alg.usage(s)
    local allowed, retry = 0, -1
    local k, t = own[2 * i - 1], own[2 * i]
    if k == AT and t == 0 then allowed = 1 elseif k == AT then retry = t end
    out[#out + 1] = allowed
    out[#out + 1] = remaining
    out[#out + 1] = reset
    out[#out + 1] = retry
  end
end

-- The smallest instant at which every enforcing slot admits (core's
-- fixpoint); true as the second value when some slot can never admit.
local function fixpoint(slots, own)
  local t = 0
  for i, s in ipairs(slots) do
    if not s.p.shadow then
      if own[2 * i - 1] ~= AT then return 0, true end
      t = max(t, own[2 * i])
    end
  end
  if #slots == 1 or t == 0 then return t, false end
  for _ = 1, 64 do
    local moved = false
    for _, s in ipairs(slots) do
      if not s.p.shadow then
        local k, x = earliest(s, t)
        if k ~= AT then return 0, true end
        if x > t then t, moved = x, true end
      end
    end
    if not moved then return t, false end
  end
  return 0, true
end

local function all_reservable(slots, x, at)
  for _, s in ipairs(slots) do
    if not s.p.shadow and not reservable(s, x, at) then return false end
  end
  return true
end

-- The earliest arrival that would be admitted, at once or held (core's retry_instant).
local function retry_instant(slots, may_hold, start)
  local x = 0
  for _ = 1, 64 do
    if x >= start then break end
    local hold, nxt = INF, start
    for _, s in ipairs(slots) do
      if not s.p.shadow then
        local k, t = earliest(s, x)
        local h = may_hold and s.p.hold or 0
        if k == AT and t == x then
        elseif k == AT then hold, nxt = min(hold, h), min(nxt, t)
        else hold = min(hold, h) end
      end
    end
    local within = start - x <= hold
    if within and all_reservable(slots, x, start) then return x end
    if not within then
      nxt = min(nxt, start - hold)
    else
      local lo, hi = x, nxt
      while hi - lo > 1 do
        local mid = lo + floor((hi - lo) / 2)
        if all_reservable(slots, mid, start) then hi = mid else lo = mid end
      end
      nxt = hi
    end
    x = max(nxt, x + 1)
  end
  return start
end

-- One decision over `slots`, its reply appended to `out`.
local function decide(out, slots, op)
  -- The common case, one enforcing limit with room now, needs none of the
  -- combination below (core's admit_single_now).
  local only = slots[2] == nil and slots[1]
  if only and op ~= 'u' and not only.p.shadow then
    local alg = only.p.alg
    if alg.fast then
      if alg.fast(only, out, op == 'h') then return end
    else
      local k, t = alg.earliest(only, only.cost, 0)
      if k == AT and t == 0 then
        alg.commit(only, only.charge, 0)
        save(only)
        local n = #out
        out[n + 1] = 3
        out[n + 2], out[n + 3] = alg.usage(only)
        return
      end
    end
  end
  local own = {}
  for i, s in ipairs(slots) do own[2 * i - 1], own[2 * i] = earliest(s, 0) end
  local base = #out
  out[base + 1], out[base + 2], out[base + 3], out[base + 4] = 0, 0, 0, 0

  if op == 'u' then return report(out, slots, own) end
  local may_hold = op == 'h'

  for i, s in ipairs(slots) do
    if own[2 * i - 1] == NEVER and not s.p.shadow then
      out[base + 1], out[base + 2], out[base + 3], out[base + 4] = 2, i - 1, s.cost, own[2 * i]
      return report(out, slots, own)
    end
  end

  local start, blocked = fixpoint(slots, own)
  local hold, any = INF, false
  for i, s in ipairs(slots) do
    if not s.p.shadow and not (own[2 * i - 1] == AT and own[2 * i] == 0) then
      hold, any = min(hold, may_hold and s.p.hold or 0), true
    end
  end
  if not any then hold = 0 end
  local fits = not blocked and start == 0
  if not blocked and start > 0 and start <= hold then
    fits = all_reservable(slots, 0, start)
  end

  if not fits then
    local limit, rank = 0, -1
    for i, s in ipairs(slots) do
      if not s.p.shadow then
        local r = own[2 * i - 1] == AT and max(0, own[2 * i]) or INF
        if r > rank then limit, rank = i - 1, r end
      end
    end
    local retry = -1
    if not blocked then retry = retry_instant(slots, may_hold, start) end
    out[base + 1], out[base + 2], out[base + 3] = 1, limit, retry
    return report(out, slots, own)
  end

  out[base + 2] = start
  local all = start == 0
  for _, s in ipairs(slots) do
    local alg = s.p.alg
    local allowed, retry = 1, -1
    if s.p.shadow then
      local k, t = earliest(s, start)
      if k == AT and t == start and alg.reservable(s, 0, start) then
        alg.commit(s, s.charge, start)
      elseif k == AT then
        allowed, retry = 0, t
      else
        allowed = 0
      end
    else
      alg.commit(s, s.charge, start)
    end
    save(s)
    local remaining, reset = alg.usage(s)
    out[#out + 1] = allowed
    out[#out + 1] = remaining
    out[#out + 1] = reset
    out[#out + 1] = retry
    all = all and allowed == 1
  end
  if all then
    -- the short form: {3, then per slot: remaining, reset}
    out[base + 1] = 3
    local n = #slots
    for i = 1, n do
      local at = base + 4 + 4 * (i - 1)
      out[base + 2 * i], out[base + 2 * i + 1] = out[at + 2], out[at + 3]
    end
    for i = #out, base + 2 * n + 2, -1 do out[i] = nil end
  end
end

-- Leases: op "l" ("m" when the request may be held). A slot with a lease
-- argument first gives back the units its earlier slices did not use (each
-- with the mark its grant returned), then asks for a slice: the most of
-- `want` units its key has now, at least the request's cost, taken with the
-- request's other limits all-or-nothing. When no slice can be had the
-- request is decided as "d" ("h") decides it. After the decision's reply,
-- per slot: units granted (0: none), the mark (whole second, ns) and until
-- when the slice may be used (ns from now).
-- Give back what each asking slot's argument returns (its earlier slices'
-- unused units, each with its mark).
local function refund_all(slots, asks)
  for i, s in ipairs(slots) do
    local a = asks[i]
    if a and s.p.alg.refund then
      for _, r in ipairs(a.refunds) do
        s.p.alg.refund(s, r[1], since(r[2]) + r[3])
      end
    end
  end
end

-- Write back the slots a refund changed and nothing else saved.
local function save_dirty(slots)
  for _, s in ipairs(slots) do
    if s.dirty then save(s) end
  end
end

-- Whether a decision's reply (from `base` in `out`) admits at once.
local function admits_now(out, base)
  local kind = out[base + 1]
  return kind == 3 or (kind == 0 and out[base + 2] == 0)
end

-- The reply's four values per slot: units lent, the mark, until.
local function grants(out, slots, lent)
  for _, s in ipairs(slots) do
    local n = #out
    if lent and s.lent then
      local mark, until_ = s.p.alg.grant(s)
      local total = nowN + mark
      local sec = floor(total / BIL)
      out[n + 1], out[n + 2], out[n + 3], out[n + 4] = s.cost, nowS + sec, total - sec * BIL, until_
    else
      out[n + 1], out[n + 2], out[n + 3], out[n + 4] = 0, 0, 0, -1
    end
  end
end

local function lease(out, slots, asks, may_hold)
  refund_all(slots, asks)
  local base, asked = #out, false
  for i, s in ipairs(slots) do
    local a = asks[i]
    s.lent = false
    if a and s.p.alg.grant and s.cost == s.charge and s.cost > 0 then
      local k = min(a.want, (s.p.alg.usage(s)))
      if k >= s.cost then s.lent, s.cost, s.charge, asked = s.cost, k, k, true end
    end
  end
  local lent = false
  if asked then
    decide(out, slots, 'd')
    lent = admits_now(out, base)
    if not lent then
      for i = #out, base + 1, -1 do out[i] = nil end
      for _, s in ipairs(slots) do
        if s.lent then s.cost, s.charge, s.lent = s.lent, s.lent, false end
      end
    end
  end
  if not lent then decide(out, slots, may_hold and 'h' or 'd') end
  save_dirty(slots)
  grants(out, slots, lent)
end

-- Op "p": a slice for each asking slot ahead of need (its current one runs
-- low), with no request of its own: the most of `want` the key has now, at
-- least one unit, all-or-nothing over the slots; nothing is taken when that
-- cannot be had. The reply is the four values per slot alone.
local function prefetch(out, slots, asks)
  refund_all(slots, asks)
  local lent = true
  for i, s in ipairs(slots) do
    local a = asks[i]
    local k = a and s.p.alg.grant and min(a.want, (s.p.alg.usage(s))) or 0
    s.lent = k >= 1 and 1
    if s.lent then s.cost, s.charge = k, k else lent = false end
  end
  if lent then
    local scratch = {}
    decide(scratch, slots, 'd')
    lent = admits_now(scratch, 0)
  end
  save_dirty(slots)
  grants(out, slots, lent)
end

-- Op "r": give back slices' unused units (as `lease` does first), nothing else.
local function give_back(slots, asks)
  refund_all(slots, asks)
  save_dirty(slots)
end

-- A lease argument: "-" (none), or "want" followed by any number of
-- ":units:markS:markN" refunds.
local function ask(text)
  if text == '-' then return false end
  local want, rest = match(text, '^(%d+)(.*)$')
  if not want then error('tollgate: bad lease argument ' .. text) end
  local refunds = {}
  for units, ms, mn in gmatch(rest, ':(%d+):(%d+):(%d+)') do
    refunds[#refunds + 1] = { tonumber(units), tonumber(ms), tonumber(mn) }
  end
  return { want = tonumber(want), refunds = refunds }
end

-- Settle a completed request: release concurrency, debit latency.
local function finish(slots, latency)
  for _, s in ipairs(slots) do
    local alg = s.p.alg
    if alg == CONCURRENCY then alg.release(s, s.charge) save(s)
    elseif s.p.latency and latency > 0 then alg.debit(s, latency) save(s) end
  end
end

-- A decision's head: op, slot count, and a caller's instant if any.
local HEADS = {}
local function head(text)
  local h = HEADS[text]
  if h then return h[1], h[2], h[3] end
  local op, n, sec, ns = match(text, '^(%a)(%d+)@?(%d*):?(%d*)$')
  if not op then error('tollgate: bad decision head ' .. text) end
  n = tonumber(n)
  if sec == '' then
    HEADS[text] = { op, n }
    return op, n
  end
  return op, n, { tonumber(sec), tonumber(ns) }
end

-- "cost" or "cost/charge" -> cost, charge
local function amounts(text)
  local c = SMALL[text]
  if c then return c, c end
  local cost, charge = match(text, '^(%d+)/?(%d*)$')
  cost = tonumber(cost)
  if charge == '' then return cost, cost end
  return cost, tonumber(charge)
end

-- Slot tables, reused from decision to decision (a table costs more than
-- the rest of a simple decision): every field a slot gets is named here, so
-- each is sized once; `run` resets the fields an algorithm's load does not.
local POOL, SLOTS, slots_n = {}, {}, 0
local function slot(i)
  local s = POOL[i]
  if not s then
    s = { key = false, p = false, cost = 0, charge = 0, stored = false, expiry = false,
      tn = false, tf = false, v = false, w = false, counts = false, adds = false,
      mod = false, head = false, c = false, n = false, dirty = false, lent = false, x = false }
    POOL[i] = s
  end
  return s
end

local function run(keys, argv)
  local out, pos, keybase = {}, 1, 0
  local server_time
  while argv[pos] do
    local op, n, caller = head(argv[pos])
    local latency = 0
    if op == 'f' then
      latency = tonumber(argv[pos + 1])
      pos = pos + 1
    end
    pos = pos + 1
    if caller then
      nowS, nowN = caller[1], caller[2]
    else
      if not server_time then
        local t = redis.call('TIME')
        server_time = { tonumber(t[1]), tonumber(t[2]) * 1000 }
      end
      nowS, nowN = server_time[1], server_time[2]
    end
    local slots = SLOTS
    for i = n + 1, slots_n do slots[i] = nil end
    slots_n = n
    local leasing = op == 'l' or op == 'm' or op == 'r' or op == 'p'
    local asks = leasing and {}
    for i = 1, n do
      local s = slot(i)
      s.key, s.p = keys[keybase + i], spec(argv[pos])
      s.cost, s.charge = amounts(argv[pos + 1])
      s.stored, s.expiry, s.counts, s.adds, s.dirty = false, false, false, false, false
      pos = pos + 2
      if leasing then
        asks[i] = ask(argv[pos])
        pos = pos + 1
      end
      load(s)
      slots[i] = s
    end
    keybase = keybase + n
    if op == 'f' then
      finish(slots, latency)
      out[#out + 1] = 0
    elseif op == 'r' then
      give_back(slots, asks)
      out[#out + 1] = 0
    elseif op == 'p' then
      prefetch(out, slots, asks)
    elseif leasing then
      lease(out, slots, asks, op == 'm')
    else
      decide(out, slots, op)
    end
    -- A state carried into new parameters is written even by a denial.
    if op ~= 'u' then save_dirty(slots) end
  end
  return out
end

if redis.register_function then
  redis.register_function('TOLLGATE_FUNCTION', function(keys, argv)
    if not floor then bind(true) end
    return run(keys, argv)
  end)
else
  bind(false)
  return run(KEYS, ARGV)
end
