-- wrk script for bench/compare.py: a V2 REST JSON request with one iris row.
--   wrk -s bench/iris.lua http://127.0.0.1:8080/v2/models/iris/infer
--   wrk -s bench/iris.lua http://127.0.0.1:8080 -- 100 iris-    (round-robin over /v2/models/iris-0 ... iris-99/infer)
-- done() prints one line starting with WRKJSON: requests, duration, latency p50/p99, errors.

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"inputs":[{"name":"input-0","datatype":"FP32","shape":[1,4],"data":[5.1,3.5,1.4,0.2]}]}'

local requests, count, i = {}, 1, 0

function init(args)  -- called by wrk.init, once per thread, after the Host header is set
  local models = tonumber(args[1] or "0")
  if models == 0 then
    requests[1] = wrk.format()
  else
    count = models
    for n = 0, models - 1 do
      requests[n + 1] = wrk.format(nil, "/v2/models/" .. (args[2] or "iris-") .. n .. "/infer")
    end
  end
end

function request()  -- prebuilt requests, in turn
  i = i % count + 1
  return requests[i]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "p50_us": %.1f, "p99_us": %.1f, "mean_us": %.1f, "status_errors": %d, "socket_errors": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.mean,
    e.status, e.connect + e.read + e.write + e.timeout))
end
