-- wrk script for benches/load.sh (see benches/README.md).
--
-- Arguments after `--`:
--   1 mode      "create" (POST /v1/verifications) or "check" (POST /v1/verifications/check)
--   2 key       API key, sent as `Authorization: Bearer KEY`
--   3 nonce     a per-run string that makes every email address unique across runs
--   4 method    "link" | "code" | "link_and_code", or "-" to leave the field out (create only)
--   5 ids_out   path prefix: write the id of every 202 answer to IDS_OUT.<thread>, or "-"
--   6 ids_in    file of verification ids, one a line, to check against (check only), or "-"
--   7 nthreads  the -t value, so that each thread takes a disjoint slice of ids_in
--   8 limit     create mode: creates per thread, then GET /healthz for the rest of the run;
--               0 (or absent) = no limit. The seed run uses it to create an exact pool.
--
-- Prints one line `RESULT k=v ...` from done(): req/s, latency percentiles in microseconds,
-- socket errors, wrk's "Non-2xx or 3xx" count, and every HTTP status seen with its count.

local threads = {}
local n_setup = 0

function setup(thread)
   n_setup = n_setup + 1
   thread:set("tid", n_setup)
   table.insert(threads, thread)
end

-- Globals (not locals) where done() reads them through thread:get.
statuses = {}

local mode, nonce, method_field, out
local headers
local pool = {}
local counter = 0
local limit = 0
local health

function init(args)
   mode = args[1]
   local key = args[2]
   nonce = args[3]
   local method = args[4]
   local ids_out, ids_in, nthreads = args[5], args[6], tonumber(args[7])
   limit = tonumber(args[8] or "0") or 0
   health = wrk.format("GET", "/healthz")
   headers = {
      ["Authorization"] = "Bearer " .. key,
      ["Content-Type"] = "application/json",
   }
   method_field = ""
   if method ~= nil and method ~= "-" then
      method_field = string.format(',"method":"%s"', method)
   end
   if ids_out ~= nil and ids_out ~= "-" then
      out = assert(io.open(ids_out .. "." .. tid, "w"))
      out:setvbuf("line") -- wrk never closes the thread's Lua state: flush every line
   end
   if mode == "check" then
      local i = 0
      for line in io.lines(ids_in) do
         if line ~= "" then
            if i % nthreads == tid - 1 then
               pool[#pool + 1] = line
            end
            i = i + 1
         end
      end
      assert(#pool > 0, "no verification ids for thread " .. tid)
   elseif mode ~= "create" then
      error("mode must be create or check, not " .. tostring(mode))
   end
end

function request()
   counter = counter + 1
   if mode == "create" then
      if limit > 0 and counter > limit then
         return health
      end
      -- Unique per request: counter, thread and run nonce. The daemon's supersede logic (same
      -- app, email, purpose) and per-address rate limits therefore never come into play.
      local body = string.format('{"email":"u%d-t%d-%s@example.com"%s}',
                                 counter, tid, nonce, method_field)
      return wrk.format("POST", "/v1/verifications", headers, body)
   end
   -- Round robin over this thread's ids: every id gets one wrong guess per pass.
   local id = pool[(counter - 1) % #pool + 1]
   local body = string.format('{"id":"%s","code":"000000"}', id)
   return wrk.format("POST", "/v1/verifications/check", headers, body)
end

function response(status, hdrs, body)
   statuses[status] = (statuses[status] or 0) + 1
   if out ~= nil and status == 202 then
      local id = string.match(body, '"id":"([^"]+)"')
      if id ~= nil then
         out:write(id, "\n")
      end
   end
end

function done(summary, latency, requests)
   local agg = {}
   for _, t in ipairs(threads) do
      local s = t:get("statuses")
      if s ~= nil then
         for k, v in pairs(s) do
            agg[k] = (agg[k] or 0) + v
         end
      end
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
      "RESULT rps=%.1f requests=%d p50_us=%d p90_us=%d p99_us=%d max_us=%d "
      .. "connect_err=%d read_err=%d write_err=%d timeouts=%d non2xx3xx=%d statuses=%s\n",
      summary.requests / secs, summary.requests,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
      e.connect, e.read, e.write, e.timeout, e.status, table.concat(parts, ",")))
end
