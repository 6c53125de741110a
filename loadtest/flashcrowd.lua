-- wrk script for loadtest/flashcrowd.sh: cycles through the request paths listed one per line in
-- the file named by $PATHS (like loadtest/paths.lua), tallies the response statuses per
-- code, and prints one machine-readable RESULT line at the end:
--   RESULT requests=N seconds=S bytes=B status_200=N status_503=N ... status_other=N
--          connect=N read=N write=N timeout=N status_errors=N p50_ms=X p99_ms=X max_ms=X
-- (status_other: responses with a code outside 200 and 503; status_errors: wrk's own count of
-- responses with a code >= 400, for cross-checking the tally.)
-- Each thread starts at a different offset into the list (thread k of T at k*N/T), so the first
-- wave of connections spreads over the whole list instead of every thread asking for the same
-- first paths.
local paths = {}
for line in io.lines(os.getenv("PATHS")) do
  if line ~= "" then paths[#paths + 1] = line end
end
assert(#paths > 0, "no paths in $PATHS")

-- main state: every thread, for done() to collect its tally
local threads = {}
local nthreads = tonumber(os.getenv("WRK_THREADS") or "") or 2

function setup(thread)
  local k = #threads
  thread:set("offset", math.floor(k * #paths / nthreads))
  threads[#threads + 1] = thread
end

-- thread state
offset = 0
counts = {}
local i = nil

function request()
  if i == nil then i = offset % #paths end
  i = i % #paths + 1
  return wrk.format("GET", paths[i])
end

function response(status, headers, body)
  counts[status] = (counts[status] or 0) + 1
end

function done(summary, latency, requests)
  local total = {}
  for _, t in ipairs(threads) do
    local c = t:get("counts")
    if c then
      for code, n in pairs(c) do total[code] = (total[code] or 0) + n end
    end
  end
  local codes = {}
  for code in pairs(total) do codes[#codes + 1] = code end
  table.sort(codes)
  local parts, other = {}, 0
  parts[#parts + 1] = string.format("status_200=%d status_503=%d", total[200] or 0, total[503] or 0)
  for _, code in ipairs(codes) do
    if code ~= 200 and code ~= 503 then
      parts[#parts + 1] = string.format("status_%d=%d", code, total[code])
      other = other + total[code]
    end
  end
  parts[#parts + 1] = string.format("status_other=%d", other)
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d seconds=%.3f bytes=%d %s connect=%d read=%d write=%d timeout=%d status_errors=%d p50_ms=%.2f p99_ms=%.2f max_ms=%.2f\n",
    summary.requests, summary.duration / 1e6, summary.bytes, table.concat(parts, " "),
    e.connect, e.read, e.write, e.timeout, e.status,
    latency:percentile(50) / 1e3, latency:percentile(99) / 1e3, latency.max / 1e3))
end
