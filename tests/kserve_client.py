"""Runs in a venv of its own with KServe's Python package (kserve pins its own dependencies): its
REST client (V2 protocol; JSON, binary and BYTES) and its gRPC client against fleetserve. Prints
one JSON document of what they answered; the test checks it. Usage: python kserve_client.py URL GRPC."""

import asyncio
import json
import sys

import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig

ROWS = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)


def iris_request(binary: bool) -> InferRequest:
    tensor = InferInput("input-0", list(ROWS.shape), "FP32")
    tensor.set_data_from_numpy(ROWS, binary_data=binary)
    return InferRequest(model_name="iris", infer_inputs=[tensor], request_id="kserve-1")


async def main(url: str, grpc_address: str) -> dict:
    answers = {}
    rest = InferenceRESTClient(RESTConfig(protocol="v2", retries=0))
    try:
        answers["rest_ready"] = await rest.is_server_ready(url)
        for binary in (False, True):
            response = await rest.infer(url, iris_request(binary), model_name="iris")
            answers[f"rest_{'binary' if binary else 'json'}"] = response.outputs[0].as_numpy().tolist()
        text = InferInput("text", [2], "BYTES")
        text.set_data_from_numpy(np.array([b"hello there", b"one"], dtype=object), binary_data=False)
        response = await rest.infer(url, InferRequest(model_name="text-stats", infer_inputs=[text]), model_name="text-stats")
        answers["rest_bytes"] = {output.name: output.as_numpy().tolist() for output in response.outputs}
        try:
            await rest.infer(url, InferRequest(model_name="nowhere", infer_inputs=[iris_request(False).inputs[0]]),
                             model_name="nowhere")
        except Exception as error:  # httpx.HTTPStatusError with the server's {"error"}
            answers["rest_error"] = str(error)
    finally:
        await rest.close()
    async with InferenceGRPCClient(grpc_address, timeout=30) as grpc_client:
        answers["grpc_ready"] = await grpc_client.is_server_ready()
        response = await grpc_client.infer(iris_request(False))
        answers["grpc"] = response.outputs[0].as_numpy().tolist()
        answers["grpc_model"] = response.model_name
    return answers


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2]))))
