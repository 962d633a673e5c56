-- wrk script for scripts/bench.sh's semantic-cache and rag rows (and bare's provider-call row):
--   wrk ... -s bench/wrk-callout.lua URL -- body.json WORDS EXPECT NONCE
-- POSTs the JSON body of the file body.json; when WORDS > 0, every request replaces `@UNIQUE@`
-- in it with WORDS new words: `<NONCE>t<thread>n<count>` (no two prompts of the run are equal:
-- the exact tier misses) and WORDS - 1 random 8-character words (no two prompts are near: the
-- mock's embeddings hash each word into one of 256 buckets, and words that differ only in their
-- last character land in correlated buckets, so counters alone make distance-0 twins after a
-- few hundred prompts). EXPECT is the prefix the `x-sluice-cache`
-- response header must start with (`miss`, `hit-exact`, `hit-semantic`), or `-` for no check;
-- a 2xx/3xx answer that is not a 200 with that header counts as `errors_unexpected` (wrk itself
-- counts statuses above 399). Every row runs this same script, so the client's own work (a
-- body per request, the response callback) is the same for bare and the filters.
-- When the run ends it prints one line `BENCHJSON {...}` like bench/wrk-post.lua.
local threads = {}
local counter = 0
local alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"

local function random_word()
  local c = {}
  for i = 1, 8 do
    local k = math.random(1, #alphabet)
    c[i] = alphabet:sub(k, k)
  end
  return table.concat(c)
end

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  local f = assert(io.open(args[1], "rb"))
  template = f:read("*a")
  f:close()
  words = tonumber(args[2]) or 0
  expect = args[3] or "-"
  nonce = args[4] or "x"
  wrk.method = "POST"
  wrk.body = template
  unexpected = 0
  first_unexpected = ""
  local seed = 7
  for i = 1, #nonce do
    seed = (seed * 31 + nonce:byte(i)) % 2147483647
  end
  math.randomseed(seed + (id or 0) * 7919)
end

function request()
  if words == 0 then
    return wrk.format()
  end
  counter = counter + 1
  local w = {string.format("%st%dn%d", nonce, id or 0, counter)}
  for i = 2, words do
    w[i] = random_word()
  end
  local body = template:gsub("@UNIQUE@", table.concat(w, " "), 1)
  return wrk.format(nil, nil, nil, body)
end

function response(status, headers, body)
  if status >= 400 then
    return
  end
  local got = headers["x-sluice-cache"] or ""
  if status ~= 200 or (expect ~= "-" and got:sub(1, #expect) ~= expect) then
    unexpected = unexpected + 1
    if first_unexpected == "" then
      first_unexpected = (status .. " x-sluice-cache: " .. got):gsub('[^%w%p ]', "?"):gsub('["\\]', "'")
    end
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  local bad, first = 0, ""
  for _, t in ipairs(threads) do
    bad = bad + (t:get("unexpected") or 0)
    if first == "" then
      first = t:get("first_unexpected") or ""
    end
  end
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"bytes":%d,"errors_connect":%d,"errors_read":%d,' ..
    '"errors_write":%d,"errors_status":%d,"errors_timeout":%d,"errors_unexpected":%d,' ..
    '"first_unexpected":"%s","lat_p50_us":%d,"lat_p90_us":%d,"lat_p99_us":%d,"lat_p999_us":%d,' ..
    '"lat_max_us":%d,"lat_mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, bad, first, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
