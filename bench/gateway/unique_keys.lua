-- wrk script: every request carries a new `x-tenant-id` (k<start>, k<start+1>, ...)
-- and the thread stops once it has `count` responses, so exactly the keys
-- k<start> .. k<start+count-1> are sent (plus at most one request per
-- connection in flight at the stop, which reuse keys of that range).
-- usage: wrk -t 1 -c N -d MAX -s unique_keys.lua URL -- START COUNT [DONE_FILE]
-- wrk's main thread sleeps for the whole -d even when every thread has
-- stopped, so the thread also creates DONE_FILE; the caller then sends wrk
-- SIGINT, which ends the run at once with the usual report.
-- Statuses are tallied per thread and printed by done(): "status CODE N".
-- Meant for -t 1 (with more threads, each would send the same range).
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  first = tonumber(args[1] or "0")
  count = tonumber(args[2] or "1000000")
  done_file = args[3]
  nextk = 0
  seen = 0
  statuses = {}
end

function request()
  local k = first + (nextk % count)
  nextk = nextk + 1
  return wrk.format("GET", "/", { ["x-tenant-id"] = "k" .. k })
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  seen = seen + 1
  if seen == count then
    if done_file then
      local f = io.open(done_file, "w")
      if f then f:write("done\n"); f:close() end
    end
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local total = {}
  for _, t in ipairs(threads) do
    local s = t:get("statuses")
    for code, n in pairs(s) do
      total[code] = (total[code] or 0) + n
    end
  end
  for code, n in pairs(total) do
    io.write(string.format("status %d %d\n", code, n))
  end
end
