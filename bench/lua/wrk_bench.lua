-- wrk script for bench/: a machine-readable summary line, and optionally a fixed rate.
--
-- wrk -s wrk_bench.lua URL                 unpaced (max req/s)
-- wrk -s wrk_bench.lua URL -- RATE THREADS a fixed offered rate (wrk itself has none)
--
-- Paced: each thread owns a Poisson arrival schedule at RATE/THREADS; whenever one of its
-- connections is free, delay() hands it the next unclaimed slot and wrk sends then, so the
-- offered rate does not fall when latency grows (as it would with a think time), as long
-- as a connection is free at every slot (latency << connections / rate).
-- Latency is wrk's own: request written -> response read, microsecond histogram.
-- Adapted from the Envoy HBONE reference rig (shared/peers/envoy-hbone/lua/paced.lua).
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec_t;
int clock_gettime(int clk_id, bench_timespec_t *tp);
]]
local ts = ffi.new("bench_timespec_t")
local function now_ms()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000.0 + tonumber(ts.tv_nsec) / 1e6
end

local mean_gap_ms = nil
local next_slot = nil

local function paced_delay()
  local t = now_ms()
  if next_slot == nil then next_slot = t end
  local u = math.random()
  if u < 1e-12 then u = 1e-12 end
  next_slot = next_slot + (-mean_gap_ms * math.log(u))
  local d = next_slot - t
  if d <= 0 then return 0 end
  -- wrk's timers take whole milliseconds: round stochastically to keep the mean rate
  return math.floor(d + math.random())
end

function init(args)
  if args[1] ~= nil then
    mean_gap_ms = tonumber(args[2] or "1") * 1000.0 / tonumber(args[1])
    math.randomseed(os.time() + (tonumber(tostring({}):sub(8), 16) or 0) % 100003)
    delay = paced_delay -- wrk looks for a global delay() after init()
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "JSON {\"requests\":%d,\"duration_us\":%d,\"bytes\":%d,\"p50_us\":%d,\"p90_us\":%d," ..
    "\"p99_us\":%d,\"max_us\":%d,\"err_connect\":%d,\"err_read\":%d,\"err_write\":%d," ..
    "\"err_status\":%d,\"err_timeout\":%d}\n",
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
