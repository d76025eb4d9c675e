-- wrk script for bench/heartbeats.py: replays pre-generated, pre-signed heartbeats.
--
-- Environment (set by heartbeats.py):
--   HB_FILE     request file, one request per line: plugin_id \t timestamp \t signature \t body
--   HB_THREADS  number of wrk threads (-t); thread k sends lines k, k+T, k+2T, ... so no
--               signed request is ever sent twice (a second copy would be a replay: 401)
--   HB_SUMMARY  optional path; done() writes its JSON summary line there as well as to stdout
--   HB_PATH     optional request path (default /api/plugins/heartbeat)
--
-- Requests are formatted once in init(), so request() only hands out a prepared string and
-- wrk spends its CPU on the network. When a thread runs out of requests it stops (and the
-- summary says so): the figures of such a run are not valid.
-- No response() hook: defining one makes wrk parse every response in Lua. Non-2xx/3xx
-- responses are counted by wrk itself (summary.errors.status).

local threads = {}
local next_id = 0

function setup(thread)
   thread:set("tid", next_id)
   next_id = next_id + 1
   table.insert(threads, thread)
end

local reqs = {}
local count = 0
local pos = 0
local exhausted_req = nil

function init(args)
   local file = os.getenv("HB_FILE")
   local nthreads = tonumber(os.getenv("HB_THREADS") or "1")
   local path = os.getenv("HB_PATH") or "/api/plugins/heartbeat"
   local id = tid or 0
   if file == nil then
      error("HB_FILE is not set")
   end
   local f = assert(io.open(file, "r"))
   local lineno = 0
   for line in f:lines() do
      if lineno % nthreads == id then
         local plugin, ts, sig, body = line:match("^([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$")
         if plugin ~= nil then
            count = count + 1
            reqs[count] = wrk.format("POST", path, {
               ["Content-Type"] = "application/json",
               ["X-Plugin-Id"] = plugin,
               ["X-Timestamp"] = ts,
               ["X-Signature"] = sig,
            }, body)
         end
      end
      lineno = lineno + 1
   end
   f:close()
   exhausted_req = wrk.format("GET", "/__bench_requests_exhausted")
   loaded = count
   sent = 0
   exhausted = 0
end

function request()
   pos = pos + 1
   if pos > count then
      exhausted = exhausted + 1
      if exhausted == 1 then
         wrk.thread:stop()
      end
      return exhausted_req
   end
   sent = pos
   return reqs[pos]
end

function done(summary, latency, requests)
   local loaded_total, sent_total, exhausted_threads = 0, 0, 0
   for _, t in ipairs(threads) do
      loaded_total = loaded_total + (t:get("loaded") or 0)
      sent_total = sent_total + (t:get("sent") or 0)
      if (t:get("exhausted") or 0) > 0 then
         exhausted_threads = exhausted_threads + 1
      end
   end
   local e = summary.errors
   local non2xx = e.status
   local line = string.format(
      '{"requests": %d, "duration_s": %.6f, "bytes": %d, "non2xx": %d, '
         .. '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, '
         .. '"latency_ms": {"p50": %.3f, "p90": %.3f, "p99": %.3f, "p999": %.3f, '
         .. '"mean": %.3f, "max": %.3f}, '
         .. '"loaded": %d, "sent": %d, "exhausted_threads": %d, "threads": %d}',
      summary.requests,
      summary.duration / 1e6,
      summary.bytes,
      non2xx,
      e.connect,
      e.read,
      e.write,
      e.status,
      e.timeout,
      latency:percentile(50) / 1000,
      latency:percentile(90) / 1000,
      latency:percentile(99) / 1000,
      latency:percentile(99.9) / 1000,
      latency.mean / 1000,
      latency.max / 1000,
      loaded_total,
      sent_total,
      exhausted_threads,
      #threads
   )
   io.write("HB_SUMMARY " .. line .. "\n")
   local out = os.getenv("HB_SUMMARY")
   if out ~= nil and out ~= "" then
      local f = assert(io.open(out, "w"))
      f:write(line .. "\n")
      f:close()
   end
end
