-- bench/redis/profile: NOT tollgate's script. A lower bound for what one
-- fixed-window decision costs inside Redis when written as a lean Lua
-- script: the same work as decide.lua's fixed-window path for one slot
-- (Redis TIME, GET the state, count in the current window, SET it back with
-- an expiry, reply with the same 4 + 4 integers), without decide.lua's
-- generality (no closures per meter, no field-count parsing, no fixpoint).
-- KEYS[1] the counter; ARGV: same layout as decide.lua for one "f" slot.
local t = redis.call('TIME')
local now_s = tonumber(t[1])
local quota, every_s = tonumber(ARGV[11]), tonumber(ARGV[13]) / 1000000000
local start = now_s - now_s % every_s
local used = 0
local state = redis.call('GET', KEYS[1])
if state then
  local s, u = string.match(state, '^(%d+)|(%d+)')
  if tonumber(s) == start then used = tonumber(u) end
end
local cost = tonumber(ARGV[6])
if used + cost > quota then
  return { 1, 0, (start + every_s - now_s) * 1000000000, 0, 0, 0, (start + every_s - now_s) * 1000000000, -1 }
end
used = used + cost
local reset_ms = (start + every_s - now_s) * 1000
redis.call('SET', KEYS[1], start .. '|' .. used, 'PX', reset_ms + 1000)
return { 0, 0, 0, 0, 1, quota - used, reset_ms * 1000000, -1 }
