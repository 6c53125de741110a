-- wrk script of loadtest/sharp.sh: ONE pass over a list of request paths, each made unique.
--
-- Env: PATHS  file of request paths, one per line, each ending where a tag is appended (e.g.
--             `/image-proxy?w=400&url=http%3A%2F%2F127.0.0.1%3A8081%2Fa.jpg%3Fv%3D`)
--      TAG    appended to every path as TAG-<line number>: a new TAG makes every URL new (a cold
--             load), the same TAG again replays the same URLs
--      DONE   a file written when the last path has been answered (sharp.sh then stops wrk with
--             SIGINT: wrk itself only stops at its -d duration)
-- Run with -t1 (one Lua state holds the pass) and 1 to total connections. Request i is path i; once every path has been sent,
-- delay() parks each connection for an hour, so nothing but the pass is sent or timed: wrk's
-- latency histogram holds exactly the pass's answers. The pass's wall time is from the first
-- request sent to the last answer (CLOCK_MONOTONIC through LuaJIT's ffi), not wrk's duration.
-- Prints one line at the end:
--   RESULT answered= sent= total= seconds= rps= p50_ms= p99_ms= max_ms= sock_errors= bytes=
--          hits= (answers whose Cache-Status says `hit`) s200= s503= ... (answers by status)
--          retry_after_503= (503s carrying Retry-After) c503_overloaded= ... (error answers by
--          status and the `error` code of their JSON body)
local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } sharp_lua_timespec;
int clock_gettime(int clk_id, sharp_lua_timespec *tp);
]]
local ts = ffi.new("sharp_lua_timespec")
local function now()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) / 1e9
end

local threads = {}
setup = function(thread) threads[#threads + 1] = thread end

-- per-thread state (each thread has its own Lua state; done() reads it with thread:get)
paths = {}
for line in io.lines(os.getenv("PATHS")) do paths[#paths + 1] = line end
tag = os.getenv("TAG") or "x"
done_file = os.getenv("DONE")
total = #paths
sent, answered, retry_after_503, hits = 0, 0, 0, 0
t0, t1 = 0, 0
statuses = ""
local by_status = {}

-- wrk calls delay() before every request (a connection's first too) and request() once the
-- delay is over: a request is reserved here, or else two connections waiting at once could both
-- send the last one
local reserved = 0
delay = function()
  if reserved >= total then return 3600000 end
  reserved = reserved + 1
  return 0
end

-- wrk 4 calls request() once on the first thread's state before the run, to check the script,
-- and sends nothing for it: that first call is not counted
local checked = false
request = function()
  if not checked then
    checked = true
    return wrk.format(nil, paths[1] .. tag .. "-check")
  end
  sent = sent + 1
  if sent == 1 then t0 = now() end
  local i = (sent - 1) % total + 1
  return wrk.format(nil, paths[i] .. tag .. "-" .. i)
end

response = function(status, headers, body)
  answered = answered + 1
  local key = string.format("s%d", status)
  if status >= 400 then
    local code = body and string.match(body, '"error"%s*:%s*"([%w_]+)"')
    key = string.format("c%d_%s", status, code or "none")
    by_status[key] = (by_status[key] or 0) + 1
    key = string.format("s%d", status)
  end
  by_status[key] = (by_status[key] or 0) + 1
  if status == 503 and (headers["Retry-After"] or headers["retry-after"]) then
    retry_after_503 = retry_after_503 + 1
  end
  local cs = headers["Cache-Status"] or headers["cache-status"]
  if cs and string.find(cs, "; hit", 1, true) then hits = hits + 1 end
  local parts = {}
  for k, n in pairs(by_status) do parts[#parts + 1] = string.format("%s=%d", k, n) end
  table.sort(parts)
  statuses = table.concat(parts, " ")
  if answered == total then
    t1 = now()
    if done_file then
      local f = io.open(done_file, "w")
      if f then f:write("done\n"); f:close() end
    end
  end
end

done = function(s, latency, _)
  local t = threads[1]
  local a, n, tot = t:get("answered"), t:get("sent"), t:get("total")
  local a0, a1 = t:get("t0"), t:get("t1")
  if a1 == 0 then a1 = a0 + s.duration / 1e6 end -- not finished: up to wrk's end
  local secs = a1 - a0
  local e = s.errors
  io.write(string.format(
    "RESULT answered=%d sent=%d total=%d seconds=%.3f rps=%.2f p50_ms=%.1f p99_ms=%.1f max_ms=%.1f " ..
    "sock_errors=%d bytes=%d hits=%d retry_after_503=%d %s\n",
    a, n, tot, secs, secs > 0 and a / secs or 0, latency:percentile(50) / 1e3,
    latency:percentile(99) / 1e3, latency.max / 1e3, e.connect + e.read + e.write + e.timeout,
    s.bytes, t:get("hits"), t:get("retry_after_503"), t:get("statuses")))
end
