-- Cost of the Redis commands and Lua operations decide.lua uses, in µs each
-- (20,000 calls in one EVAL; includes the loop's own ~0.05 µs).
--   redis-cli -p PORT --eval bench/redis/profile/primitives.lua
local function t() local x = redis.call('TIME') return tonumber(x[1])*1e6 + tonumber(x[2]) end
local N = 20000
local res = {}
local function bench(name, f)
  local a = t()
  for i = 1, N do f(i) end
  local b = t()
  res[#res+1] = name .. '=' .. string.format('%.3f', (b - a) / N)
end
redis.call('SET', 'mk', '1767225600:123456789|3|x|0')
bench('empty', function(i) end)
bench('GET', function(i) return redis.call('GET', 'mk') end)
bench('GET_missing', function(i) return redis.call('GET', 'nokey') end)
bench('INCRBY', function(i) redis.call('INCRBY', 'mk3', 1) end)
bench('PEXPIRE', function(i) redis.call('PEXPIRE', 'mk3', 60000) end)
bench('fmt_dd', function(i) return string.format('%d:%d', 1767225600 + i, 123456789) end)
bench('concat_tostring', function(i) return tostring(1767225600 + i) .. ':' .. tostring(123456789) end)
bench('match4', function(i) return string.match('1767225600:123456789|3|x|0', '([^|]+)|(%d+)|([^|]+)|(%d+)') end)
bench('tonumber', function(i) return tonumber('1767225600') end)
bench('closure8', function(i) local m = {} for j=1,8 do m[j] = function() return i end end return m end)
bench('table4', function(i) return {i, i, i, i} end)
redis.call('SET', 'mk4', 'x', 'PX', 60000)
bench('SET_plain', function(i) redis.call('SET', 'mk5', 'abc:123|4|x|0') end)
bench('SET_KEEPTTL', function(i) redis.call('SET', 'mk4', 'abc:123|4|x|0', 'KEEPTTL') end)
bench('SET_PX', function(i) redis.call('SET', 'mk2', 'abc:123|4|x|0', 'PX', 60000) end)
bench('SET_PX_str', function(i) redis.call('SET', 'mk2', 'abc:123|4|x|0', 'PX', '60000') end)
bench('PSETEX', function(i) redis.call('PSETEX', 'mk6', 60000, 'abc:123|4|x|0') end)
bench('PEXPIREAT', function(i) redis.call('PEXPIREAT', 'mk6', 1900000000000) end)
bench('PTTL', function(i) return redis.call('PTTL', 'mk6') end)
bench('DEL_missing', function(i) return redis.call('DEL', 'nokey2') end)
return res
