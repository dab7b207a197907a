-- wrk script for benches/load.sh (see benches/README.md).
--
-- Arguments after `--`:
--   1 mode      "create" (POST /v1/verifications), "check" (POST /v1/verifications/check),
--               "get" (GET /v1/verifications/{id}) or "link" (POST /v/{token}, the confirm
--               button on the public listener)
--   2 key       API key, sent as `Authorization: Bearer KEY` (not sent in link mode)
--   3 nonce     a per-run string that makes every email address unique across runs
--   4 method    "link" | "code" | "link_and_code", or "-" to leave the field out (create only)
--   5 ids_out   path prefix: write the id of every 202 answer to IDS_OUT.<thread>, or "-"
--   6 ids_in    check / get: file of verification ids, one a line; link: file of link tokens,
--               one a line; "-" otherwise
--   7 nthreads  the -t value, so that each thread takes a disjoint slice of ids_in
--   8 limit     create mode: creates per thread, then GET /healthz for the rest of the run;
--               0 (or absent) = no limit. The seed runs use it to create an exact pool.
--   9 pace_ms   0 (or absent) = closed loop, as fast as the server answers. > 0: every
--               connection waits a random 0.5..1.5 x pace_ms (mean pace_ms) before each request
--               (wrk's delay()), which approximates a fixed request rate of
--               connections x 1000 / (pace_ms + response time) per second.
--  10 marker    link mode: "-" (or absent) = go round the tokens again when they are used up
--               (counted as `reused`). A path prefix: once a thread has sent each of its tokens
--               it writes MARKER.<thread> and stops, as wrk does at the end of -d: the answers
--               still in flight are not counted, and the time ends there too. load.sh then
--               ends wrk (SIGINT). The request() call that finds no token left returns a
--               GET /healthz (it must return one; wrk may still write it): counted as `extra`,
--               left out of requests and req/s.
--
-- check / get go round robin over the thread's ids. link uses every token once, in order: the
-- first POST on a pending verification is the real confirm (read, verify, durable write,
-- callback); a repeated one only reads. Without a marker, a thread that has used all its tokens
-- starts over and counts those requests as `reused`; with one, it stops (see marker).
--
-- Prints one line `RESULT k=v ...` from done(): req/s, latency percentiles in microseconds
-- (p50, p75, p90, p99, p99.9), socket errors, wrk's "Non-2xx or 3xx" count, link tokens used
-- twice, and every HTTP status seen with its count.

local threads = {}
local n_setup = 0

function setup(thread)
   n_setup = n_setup + 1
   thread:set("tid", n_setup)
   table.insert(threads, thread)
end

-- Globals (not locals) where done() reads them through thread:get.
statuses = {}
reused = 0
extra = 0     -- GET /healthz returned by link threads with no token left (left out of req/s)
confirmed = 0 -- answers to link POSTs

local mode, nonce, method_field, out
local headers, link_headers
local pool = {}
local counter = 0
local limit = 0
local pace = 0
local health
local marker
local stopped = false
-- wrk calls request() once on the first thread to check the script before the run; that
-- request is never sent, so in link mode it must not use up a token.
local validating = false

function init(args)
   mode = args[1]
   local key = args[2]
   nonce = args[3]
   local method = args[4]
   local ids_out, ids_in, nthreads = args[5], args[6], tonumber(args[7])
   limit = tonumber(args[8] or "0") or 0
   pace = tonumber(args[9] or "0") or 0
   if args[10] ~= nil and args[10] ~= "-" then
      marker = args[10]
   end
   validating = (tid == 1)
   health = wrk.format("GET", "/healthz")
   headers = {
      ["Authorization"] = "Bearer " .. key,
      ["Content-Type"] = "application/json",
   }
   -- What a browser sends for the confirm page's one-button form (no fields).
   link_headers = {
      ["Content-Type"] = "application/x-www-form-urlencoded",
   }
   method_field = ""
   if method ~= nil and method ~= "-" then
      method_field = string.format(',"method":"%s"', method)
   end
   if ids_out ~= nil and ids_out ~= "-" then
      out = assert(io.open(ids_out .. "." .. tid, "w"))
      out:setvbuf("line") -- wrk never closes the thread's Lua state: flush every line
   end
   if mode == "check" or mode == "get" or mode == "link" then
      local i = 0
      for line in io.lines(ids_in) do
         if line ~= "" then
            if i % nthreads == tid - 1 then
               pool[#pool + 1] = line
            end
            i = i + 1
         end
      end
      assert(#pool > 0, "no ids / tokens for thread " .. tid)
   elseif mode ~= "create" then
      error("mode must be create, check, get or link, not " .. tostring(mode))
   end
   if pace > 0 then
      -- wrk looks for a global delay() after init(): defined only when pacing, so that the
      -- closed-loop runs do not pay for a timer per request.
      math.randomseed(tid * 7919 + os.time())
      delay = function()
         return math.floor(pace * (0.5 + math.random()) + 0.5)
      end
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
   elseif mode == "link" then
      if validating then
         validating = false
         counter = counter - 1
         return wrk.format("POST", "/v/" .. pool[1], link_headers, "")
      end
      if counter > #pool then
         if marker ~= nil then
            if not stopped then
               stopped = true
               assert(io.open(marker .. "." .. tid, "w")):close()
               wrk.thread:stop()
            end
            extra = extra + 1
            return health
         end
         reused = reused + 1
      end
      local token = pool[(counter - 1) % #pool + 1]
      return wrk.format("POST", "/v/" .. token, link_headers, "")
   end
   -- Round robin over this thread's ids: every id gets one request per pass.
   local id = pool[(counter - 1) % #pool + 1]
   if mode == "get" then
      return wrk.format("GET", "/v1/verifications/" .. id, headers)
   end
   local body = string.format('{"id":"%s","code":"000000"}', id)
   return wrk.format("POST", "/v1/verifications/check", headers, body)
end

function response(status, hdrs, body)
   if mode == "link" then
      -- The confirm answers are pages; /healthz (sent only once a thread has no token left)
      -- answers exactly this.
      if status == 200 and body == '{"status":"ok"}' then
         return
      end
      confirmed = confirmed + 1
   end
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
   local total_reused, total_extra = 0, 0
   for _, t in ipairs(threads) do
      local s = t:get("statuses")
      if s ~= nil then
         for k, v in pairs(s) do
            agg[k] = (agg[k] or 0) + v
         end
      end
      total_reused = total_reused + (t:get("reused") or 0)
      total_extra = total_extra + (t:get("extra") or 0)
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
   local n = summary.requests - total_extra
   io.write(string.format(
      "RESULT rps=%.1f requests=%d secs=%.3f p50_us=%d p75_us=%d p90_us=%d p99_us=%d p999_us=%d max_us=%d "
      .. "connect_err=%d read_err=%d write_err=%d timeouts=%d non2xx3xx=%d reused=%d extra=%d statuses=%s\n",
      n / secs, n, secs,
      latency:percentile(50), latency:percentile(75), latency:percentile(90),
      latency:percentile(99), latency:percentile(99.9), latency.max,
      e.connect, e.read, e.write, e.timeout, e.status, total_reused, total_extra, table.concat(parts, ",")))
end
