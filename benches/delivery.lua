-- wrk script for benches/delivery.sh: creates an exact number of verifications, as fast as the
-- api listener takes them, then stops (benches/README.md, "Delivery benchmark").
--
-- Arguments after `--`:
--   1 key       API key, sent as `Authorization: Bearer KEY`
--   2 nonce     a per-run string that makes every email address unique across runs
--   3 method    "link" | "code" | "link_and_code"
--   4 ttl       ttl_seconds of every verification (long enough that none expires mid-run)
--   5 limit     202 answers wanted per wrk thread; the thread stops once it has them
--   6 marker    path prefix: a thread that has its `limit` creates writes an empty MARKER.<tid>
--
-- wrk itself only ends after its -d duration (or SIGINT), even when every thread has stopped:
-- delivery.sh waits for one marker per thread and then sends wrk SIGINT.
--
-- Each thread sends creates until `limit` of them are in flight or answered 202; a create
-- answered with anything else is sent again (a new address). Connections with nothing left to
-- create send GET /healthz (cheap) until the thread's last create is answered, then the thread
-- stops itself. The run's real count is read from /metrics by delivery.sh.
--
-- Prints one line `RESULT k=v ...` from done(): creates answered 202, req/s of the whole run,
-- latency percentiles (µs), socket errors and every HTTP status seen with its count.

local threads = {}
local n_setup = 0

function setup(thread)
   n_setup = n_setup + 1
   thread:set("tid", n_setup)
   table.insert(threads, thread)
end

-- Globals (not locals) where done() reads them through thread:get.
statuses = {}
ok = 0

local headers, nonce, method, ttl, marker
local limit = 0
local sent = 0
local counter = 0
local health
-- wrk calls request() once on the first thread to validate the script before the run; that
-- request is never sent, so it must not count as a create in flight.
local validating = false

function init(args)
   local key = args[1]
   nonce = args[2]
   method = args[3]
   ttl = tonumber(args[4])
   limit = tonumber(args[5])
   marker = args[6]
   assert(key and nonce and method and ttl and limit and marker,
          "usage: -- KEY NONCE METHOD TTL LIMIT MARKER")
   headers = {
      ["Authorization"] = "Bearer " .. key,
      ["Content-Type"] = "application/json",
   }
   health = wrk.format("GET", "/healthz")
   validating = (tid == 1)
end

local function create()
   counter = counter + 1
   local body = string.format('{"email":"d%d-t%d-%s@example.com","method":"%s","ttl_seconds":%d}',
                              counter, tid, nonce, method, ttl)
   return wrk.format("POST", "/v1/verifications", headers, body)
end

function request()
   if validating then
      validating = false
      return create()
   end
   if sent < limit then
      sent = sent + 1
      return create()
   end
   return health
end

function response(status, hdrs, body)
   statuses[status] = (statuses[status] or 0) + 1
   if status == 202 then
      ok = ok + 1
      if ok == limit then
         assert(io.open(marker .. "." .. tid, "w")):close()
         wrk.thread:stop()
      end
   elseif status ~= 200 then
      -- A create that was refused (only creates answer anything but 200): send another.
      sent = sent - 1
   end
end

function done(summary, latency, requests)
   local agg, total_ok = {}, 0
   for _, t in ipairs(threads) do
      local s = t:get("statuses")
      if s ~= nil then
         for k, v in pairs(s) do
            agg[k] = (agg[k] or 0) + v
         end
      end
      total_ok = total_ok + (t:get("ok") or 0)
   end
   local parts = {}
   for k, v in pairs(agg) do
      parts[#parts + 1] = tostring(k) .. ":" .. tostring(v)
   end
   table.sort(parts)
   if #parts == 0 then
      parts[1] = "none"
   end
   local secs = summary.duration / 1e6
   local e = summary.errors
   io.write(string.format(
      "RESULT created=%d secs=%.3f rps=%.1f requests=%d p50_us=%d p99_us=%d max_us=%d "
      .. "connect_err=%d read_err=%d write_err=%d timeouts=%d statuses=%s\n",
      total_ok, secs, summary.requests / secs, summary.requests,
      latency:percentile(50), latency:percentile(99), latency.max,
      e.connect, e.read, e.write, e.timeout, table.concat(parts, ",")))
end
