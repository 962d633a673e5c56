-- wrk script for scripts/bench.sh: POSTs the JSON body read from the file named by the first
-- script argument (`wrk ... -s bench/wrk-post.lua URL -- body.json`) on every request and, when
-- the run ends, prints one line `BENCHJSON {...}`: request count, errors by kind and latency
-- percentiles in microseconds (wrk records per-request latency in µs, from writing the request
-- to reading the whole response; with one connection that is the service time of each request).
function init(args)
  local f = assert(io.open(args[1], "rb"))
  wrk.body = f:read("*a")
  f:close()
  wrk.method = "POST"
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"bytes":%d,"errors_connect":%d,"errors_read":%d,' ..
    '"errors_write":%d,"errors_status":%d,"errors_timeout":%d,"lat_p50_us":%d,"lat_p90_us":%d,' ..
    '"lat_p99_us":%d,"lat_p999_us":%d,"lat_max_us":%d,"lat_mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
