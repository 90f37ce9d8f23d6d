-- wrk script: one iris row as V2 JSON to the iris model.
wrk.method = "POST"
wrk.body = '{"inputs":[{"name":"input-0","datatype":"FP32","shape":[1,4],"data":[[5.1,3.5,1.4,0.2]]}]}'
wrk.headers["Content-Type"] = "application/json"
