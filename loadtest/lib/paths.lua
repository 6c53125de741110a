-- wrk script of loadtest/lib/load.sh and loadtest/cluster.sh: cycles through the request paths
-- listed one per line in the file named by $PATHS, and prints one machine-readable RESULT line at
-- the end (load.sh reads it).
local paths = {}
for line in io.lines(os.getenv("PATHS")) do paths[#paths + 1] = line end
local i = 0
request = function()
  i = i % #paths + 1
  return wrk.format("GET", paths[i])
end
done = function(s, latency, _)
  local e = s.errors
  io.write(string.format(
    "RESULT requests=%d seconds=%.3f bytes=%d errors=%d p50_ms=%.2f p99_ms=%.2f max_ms=%.2f\n",
    s.requests, s.duration / 1e6, s.bytes, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50) / 1e3, latency:percentile(99) / 1e3, latency.max / 1e3))
end
