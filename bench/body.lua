-- wrk script for bench/compare.py: POST a prebuilt request body read from a file.
--   wrk -s bench/body.lua URL -- BODY_FILE [CONTENT_TYPE] [INFERENCE_HEADER_CONTENT_LENGTH]
-- With the third argument the body is Triton's binary tensor format (JSON header, then raw
-- tensor bytes), as tritonclient.http sends it by default.
-- done() prints one line starting with WRKJSON: requests, duration, latency p50/p99, errors.

wrk.method = "POST"

function init(args)
  local file = assert(io.open(args[1], "rb"))
  wrk.body = file:read("*all")
  file:close()
  wrk.headers["Content-Type"] = args[2] or "application/json"
  if args[3] then
    wrk.headers["Inference-Header-Content-Length"] = args[3]
  end
end  -- wrk.init, which calls this, then builds the request once

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "p50_us": %.1f, "p99_us": %.1f, "mean_us": %.1f, "status_errors": %d, "socket_errors": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.mean,
    e.status, e.connect + e.read + e.write + e.timeout))
end
