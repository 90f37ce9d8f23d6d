"""The bare handler: the least a Python V2 server can do, as a ceiling for bench/compare.py.

A raw ASGI app on uvicorn (uvloop, httptools) with orjson, and a grpc.aio twin using
tritonclient's generated GRPCInferenceService stubs (ModelInfer only), on one event loop like
fleetserve. No validation, no metrics, no routing table, no thread hop: each request is parsed,
the model is called on the event loop, and a V2-shaped answer is written.

Models: `iris` and `iris-0` ... `iris-{N-1}` (the same scikit-learn estimator loaded from
`--iris PATH` N+1 times; output `predict`) and `sum` (the sum of its FP32 input; output `sum`).
REST accepts V2 JSON and Triton's binary tensor extension (Inference-Header-Content-Length);
gRPC accepts `raw_input_contents` (tritonclient's default) and typed `contents`.

    .venv/bin/python bench/bare.py --iris model_repo/iris/model.joblib --http-port P [--grpc-port Q] [--copies 100]
"""

from __future__ import annotations

import argparse
import joblib
import numpy as np
import orjson
import uvicorn

DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}
NOT_FOUND = orjson.dumps({"error": "not found"})
models: dict[str, object] = {}


def run_model(name: str, array: np.ndarray) -> tuple[str, str, np.ndarray]:
    model = models[name]
    if model == "sum":
        return "sum", "FP32", np.array([array.sum(dtype=np.float32)], dtype=np.float32)
    return "predict", "INT64", model.predict(array).astype(np.int64)


def infer_rest(name: str, body: bytes, header_length: int | None) -> bytes:
    if header_length is None:
        request = orjson.loads(body)
        tensor = request["inputs"][0]
        array = np.asarray(tensor["data"], dtype=DTYPES[tensor["datatype"]]).reshape(tensor["shape"])
    else:
        request = orjson.loads(body[:header_length])
        tensor = request["inputs"][0]
        array = np.frombuffer(body, DTYPES[tensor["datatype"]], offset=header_length).reshape(tensor["shape"])
    output, datatype, result = run_model(name, array)
    return orjson.dumps({
        "model_name": name, "model_version": "1", "id": request.get("id"),
        "outputs": [{"name": output, "datatype": datatype, "shape": list(result.shape), "data": result}],
    }, option=orjson.OPT_SERIALIZE_NUMPY)


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    path = scope["path"]
    status, body = 200, b""
    if path.startswith("/v2/models/") and path.endswith("/infer") and scope["method"] == "POST":
        name = path[len("/v2/models/"):-len("/infer")]
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        header_length = next((int(v) for k, v in scope["headers"] if k == b"inference-header-content-length"), None)
        if name in models:
            body = infer_rest(name, b"".join(chunks), header_length)
        else:
            status, body = 404, NOT_FOUND
    elif path.startswith("/v2/models/") and path.endswith("/ready"):
        if path[len("/v2/models/"):-len("/ready")] not in models:
            status, body = 404, NOT_FOUND
    elif path not in ("/v2/health/ready", "/v2/health/live"):
        status, body = 404, NOT_FOUND
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def grpc_servicer():
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    contents_field = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT64": "int64_contents", "INT32": "int_contents"}

    class Bare(service_pb2_grpc.GRPCInferenceServiceServicer):
        async def ModelInfer(self, request, context):
            if request.model_name not in models:
                await context.abort(grpc.StatusCode.NOT_FOUND, "not found")
            tensor = request.inputs[0]
            if request.raw_input_contents:
                array = np.frombuffer(request.raw_input_contents[0], DTYPES[tensor.datatype])
            else:
                array = np.asarray(getattr(tensor.contents, contents_field[tensor.datatype]), DTYPES[tensor.datatype])
            output, datatype, result = run_model(request.model_name, array.reshape(tuple(tensor.shape)))
            return service_pb2.ModelInferResponse(
                model_name=request.model_name, model_version="1", id=request.id,
                outputs=[service_pb2.ModelInferResponse.InferOutputTensor(name=output, datatype=datatype, shape=result.shape)],
                raw_output_contents=[result.tobytes()])

    return Bare(), service_pb2_grpc


async def main(args) -> None:
    estimator = joblib.load(args.iris)
    models["iris"] = estimator
    for i in range(args.copies):
        models[f"iris-{i}"] = joblib.load(args.iris)  # separate objects, like separate models
    models["sum"] = "sum"
    server = None
    if args.grpc_port:
        import grpc

        servicer, service_pb2_grpc = grpc_servicer()
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 256 << 20),
                                          ("grpc.max_send_message_length", 256 << 20)])
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
        server.add_insecure_port(f"127.0.0.1:{args.grpc_port}")
        await server.start()
    config = uvicorn.Config(app, host="127.0.0.1", port=args.http_port, loop="uvloop", http="httptools",
                            lifespan="off", access_log=False, log_level="warning")
    await uvicorn.Server(config).serve()  # until SIGTERM or SIGINT (uvicorn handles both)
    if server is not None:
        await server.stop(0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iris", required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, default=0)
    parser.add_argument("--copies", type=int, default=0, help="extra copies of iris: iris-0 ... iris-{N-1}")
    arguments = parser.parse_args()
    import uvloop

    uvloop.run(main(arguments))
