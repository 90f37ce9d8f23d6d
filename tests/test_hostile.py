"""Hostile input, as an attacker or a broken client sends it: bodies nested to blow the stack,
shapes that overflow, values out of range, repeated names, compression bombs, binary headers that
lie, traversal in names, bytes that are no protobuf message. Each is answered with a clear 4xx
`{"error": ...}` (or a gRPC status with a plain message), and a good request right after still
gets its correct answer from a server that is alive."""

from __future__ import annotations

import gzip
import json
import struct
import zlib
from http.client import HTTPConnection

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc

from conftest import IRIS_ROWS, MAX_MESSAGE_SIZE, MIB, iris_json
from test_bad_input import tensor
from fleetserve.server.grpc_service import InferenceService

IRIS_CLASSES = [0, 2]
ECHO = "/v2/models/echo/infer"
IRIS = "/v2/models/iris/infer"
DEPTH_ERROR = "JSON nesting depth exceeds the limit of 100"


def assert_iris_serves(http: httpx.Client) -> None:
    response = http.post(IRIS, json=iris_json())
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == IRIS_CLASSES


def assert_error(response: httpx.Response, status: int, fragment: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert list(body) == ["error"] and fragment in body["error"], body


def nested(depth: int, inner: str = "") -> str:
    """JSON text of `depth` lists inside one another."""
    return "[" * depth + inner + "]" * depth


DEEP_DICT = '{"a":' * 1000 + "1" + "}" * 1000  # orjson reads up to 1024 levels; repr() would recurse


def echo_body(extra: str = "") -> bytes:
    return ('{"inputs":[{"name":"a","datatype":"INT32","shape":[1],"data":[1]}]%s}' % extra).encode()


def binary(inputs: list[dict], blob: bytes, header_length: str | None = None) -> tuple[bytes, dict]:
    header = json.dumps({"inputs": inputs}).encode()
    return header + blob, {"Inference-Header-Content-Length": header_length or str(len(header))}


def billion_laughs() -> str:
    """A YAML manifest of a few hundred bytes whose aliases expand to 10**9 strings."""
    lines = ["kind: Model", "metadata: {name: laughs}", "spec:", "  storageUri: /nowhere", '  a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, 10):
        lines.append(f"  a{level}: &a{level} [" + ",".join([f"*a{level - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n"


# Each case: (method, path, body, headers, status, fragment).
REST_CASES = {
    # Nesting: orjson stops at 1024 levels and Python's json would recurse; 101..1024 parse, and are refused too.
    "inference-body-nested-200000-deep": ("POST", ECHO, ('{"inputs":' + nested(200_000) + "}").encode(), {}, 400, DEPTH_ERROR),
    "parameters-nested-101-deep": ("POST", ECHO, echo_body(',"parameters":{"x":%s}' % nested(99)), {}, 400, DEPTH_ERROR),
    "unknown-field-nested-500-deep": ("POST", ECHO, echo_body(',"whatever":%s' % nested(500)), {}, 400, DEPTH_ERROR),
    "id-nested-500-deep": ("POST", ECHO, echo_body(',"id":%s' % nested(500)), {}, 400, DEPTH_ERROR),
    "input-parameters-nested-200-deep": ("POST", ECHO, ('{"inputs":[{"name":"a","datatype":"INT32","shape":[1],"data":[1],'
                                                        '"parameters":{"p":%s}}]}' % nested(200)).encode(), {}, 400, DEPTH_ERROR),
    # NaN sends the body to Python's json, whose parser recurses.
    "nan-body-nested-5000-deep": ("POST", ECHO, echo_body(',"parameters":{"x":NaN,"y":%s}' % nested(5000)), {}, 400, DEPTH_ERROR),
    "data-nested-deeper-than-any-tensor": ("POST", ECHO, ('{"inputs":[{"name":"a","datatype":"INT32","shape":[1],"data":%s}]}'
                                                          % nested(40, "1")).encode(), {}, 400, "nested deeper than 32 levels"),
    # Tensor data is bounded by what it must be (at most 32 levels of numbers), and an error quoting it stays short.
    "data-a-dict-nested-1000-deep": ("POST", ECHO, ('{"inputs":[{"name":"a","datatype":"FP32","shape":[1],"data":%s}]}'
                                                    % DEEP_DICT).encode(), {}, 400, "FP32 data must be numbers, got {'a': {'a'"),
    "bytes-data-holding-a-dict-nested-1000-deep": ("POST", ECHO, ('{"inputs":[{"name":"a","datatype":"BYTES","shape":[1],"data":[%s]}]}'
                                                                  % DEEP_DICT).encode(), {}, 400, "BYTES data must be strings"),
    "nameless-input-with-deep-data": ("POST", ECHO, ('{"inputs":[{"datatype":"FP32","shape":[1],"data":[%s]}]}' % DEEP_DICT).encode(),
                                      {}, 400, "must be an object with a 'name'"),
    "binary-header-nested-300-deep": ("POST", ECHO, *binary([tensor("a", "INT32", [1], binary_data_size=4, p=json.loads(nested(300)))],
                                                            struct.pack("<i", 1)), 400, DEPTH_ERROR),
    "repository-index-nested-250000-deep": ("POST", "/v2/repository/index", ('{"ready":' + nested(250_000) + "}").encode(), {},
                                            400, DEPTH_ERROR),
    "repository-index-nested-150-deep": ("POST", "/v2/repository/index", ('{"ready":' + nested(150) + "}").encode(), {},
                                         400, DEPTH_ERROR),
    "load-options-nested-200-deep": ("POST", "/v2/repository/models/iris/load", ('{"parameters":{"x":' + nested(200) + "}}").encode(),
                                     {}, 400, DEPTH_ERROR),
    "manifest-yaml-nested-150-deep": ("POST", "/v2/manifests", ("kind: Model\nmetadata: {name: deep}\nspec: {storageUri: /x, p: "
                                                                + nested(150) + "}\n").encode(), {}, 400, "YAML nesting depth exceeds the limit of 100"),
    "manifest-yaml-nested-5000-deep": ("POST", "/v2/manifests", ("kind: Model\nmetadata: {name: deep}\nspec: {p: "
                                                                 + nested(5000) + "}\n").encode(), {}, 400, "YAML nesting depth exceeds"),
    "manifest-json-nested-2000-deep": ("POST", "/v2/pipelines", ('{"kind":"Pipeline","metadata":{"name":"deep"},"spec":'
                                                                 + nested(2000) + "}").encode(), {}, 400, "nesting depth exceeds"),
    "manifest-billion-laughs": ("POST", "/v2/manifests", billion_laughs().encode(), {}, 400, "expands (through aliases)"),
    # Shapes.
    "shape-element-count-overflows": ("POST", ECHO, json.dumps({"inputs": [tensor("a", "INT32", [2**4, 2**60 + 2], [1])]}).encode(),
                                      {}, 400, "too large for any array"),
    "shape-byte-size-overflows": ("POST", ECHO, json.dumps({"inputs": [tensor("a", "INT64", [2**2, 2**60 + 2], [1])]}).encode(),
                                  {}, 400, "too large for any array"),
    "shape-negative-dimension": ("POST", ECHO, json.dumps({"inputs": [tensor("a", "INT32", [2, -1], [1, 2])]}).encode(),
                                 {}, 400, "non-negative integers"),
    "shape-holding-a-huge-string": ("POST", ECHO, json.dumps({"inputs": [tensor("a", "INT32", ["x" * 100_000], [1])]}).encode(),
                                    {}, 400, "non-negative integers, got ['xxxxx"),
    "shape-64-dimensions": ("POST", ECHO, json.dumps({"inputs": [tensor("a", "INT32", [1] * 64, [1])]}).encode(),
                            {}, 400, "shape has 64 dimensions; at most 32 are supported"),
    "binary-shape-64-dimensions": ("POST", ECHO, *binary([tensor("a", "INT32", [1] * 64, binary_data_size=4)], struct.pack("<i", 1)),
                                   400, "at most 32"),
    # Repeated names.
    "duplicate-inputs": ("POST", ECHO, json.dumps({"inputs": [tensor("a", "INT32", [1], [1]), tensor("a", "INT32", [1], [2])]}).encode(),
                         {}, 400, "names inputs ['a'] more than once"),
    "duplicate-requested-outputs": ("POST", ECHO, echo_body(',"outputs":[{"name":"output-0"},{"name":"output-0"}]'), {},
                                    400, "names requested outputs ['output-0'] more than once"),
    "absent-requested-output": ("POST", ECHO, echo_body(',"outputs":[{"name":"nope"}]'), {}, 400, "has no output 'nope'"),
    # Compression: every layer is bounded; stacked encodings are refused.
    "deflate-bomb": ("POST", ECHO, lambda: zlib.compress(bytes(64 * MIB), 9), {"Content-Encoding": "deflate"},
                     413, "inflated request body exceeds the limit"),
    "stacked-gzip-gzip": ("POST", ECHO, gzip.compress(gzip.compress(echo_body())), {"Content-Encoding": "gzip, gzip"},
                          400, "stacks encodings"),
    "stacked-deflate-in-gzip": ("POST", ECHO, gzip.compress(zlib.compress(echo_body())), {"Content-Encoding": "deflate, gzip"},
                                400, "stacks encodings"),
    "deflate-inside-gzip-undeclared": ("POST", ECHO, gzip.compress(zlib.compress(echo_body())), {"Content-Encoding": "gzip"},
                                       400, "malformed JSON"),
    "gzip-bomb-inside-gzip": ("POST", ECHO, lambda: gzip.compress(gzip.compress(bytes(64 * MIB), 9)), {"Content-Encoding": "gzip"},
                              400, "malformed JSON"),
    # Binary headers that lie.
    "header-length-negative": ("POST", ECHO, *binary([tensor("a", "INT32", [1], binary_data_size=4)], struct.pack("<i", 1), "-5"),
                               400, "outside the body"),
    "header-length-huge": ("POST", ECHO, *binary([tensor("a", "INT32", [1], binary_data_size=4)], struct.pack("<i", 1),
                                                 "99999999999999999999999"), 400, "outside the body"),
    "header-length-not-a-number": ("POST", ECHO, *binary([tensor("a", "INT32", [1], binary_data_size=4)], struct.pack("<i", 1), "0x10"),
                                   400, "must be an integer"),
    "binary-size-past-the-body": ("POST", ECHO, *binary([tensor("a", "INT32", [1], binary_data_size=400)], struct.pack("<i", 1)),
                                  400, "binary data is truncated"),
    "binary-size-negative": ("POST", ECHO, *binary([tensor("a", "INT32", [1], binary_data_size=-4)], struct.pack("<i", 1)),
                             400, "binary_data_size must be a non-negative integer"),
    "binary-size-boolean": ("POST", ECHO, *binary([tensor("a", "BOOL", [1], binary_data_size=True)], b"\1"),
                            400, "binary_data_size must be a non-negative integer"),
    "binary-sizes-short-of-the-body": ("POST", ECHO, *binary([tensor("a", "INT32", [1], binary_data_size=4),
                                                              tensor("b", "INT32", [1], binary_data_size=4)], bytes(12)),
                                       400, "4 bytes of binary data are left over"),
    "bytes-prefix-runs-past-the-buffer": ("POST", ECHO, *binary([tensor("a", "BYTES", [2], binary_data_size=9)],
                                                                struct.pack("<I", 1) + b"x" + struct.pack("<I", 2**31)),
                                          400, "claims 2147483648 bytes past the end"),
    # Traversal, as the URL decodes it.
    "traversal-in-load-name": ("POST", "/v2/repository/models/..%2F..%2Fetc/load", b"", {}, 404, "Not Found"),
    "dot-dot-encoded-as-load-name": ("POST", "/v2/repository/models/%2e%2e/load", b"", {}, 400, "invalid model name '..'"),
    "traversal-in-version": ("POST", "/v2/models/iris/versions/..%2f1/infer", json.dumps(iris_json()).encode(), {}, 404, "Not Found"),
    "dot-dot-as-version": ("POST", "/v2/models/iris/versions/%2e%2e/infer", json.dumps(iris_json()).encode(), {},
                           404, "has no version '..'"),
}


@pytest.mark.parametrize("case", REST_CASES.values(), ids=REST_CASES.keys())
def test_hostile_rest_request_is_refused_and_the_server_serves_on(http, case):
    method, path, body, headers, status, fragment = case
    body = body() if callable(body) else body  # bombs are built only when their case runs
    response = http.request(method, path, content=body, headers=headers)
    assert_error(response, status, fragment)
    assert len(response.text) < 1000  # an error quotes what was sent, never all of it
    assert_iris_serves(http)


def test_nesting_up_to_the_limit_is_accepted(http):
    """The top-level object is depth 1: parameters holding 98 nested lists reach depth 100."""
    response = http.post(ECHO, content=echo_body(',"parameters":{"x":%s}' % nested(98)))
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == [1]


INTEGER_RANGES = [(datatype, int(np.iinfo(datatype.lower()).min), int(np.iinfo(datatype.lower()).max))
                  for datatype in ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64")]


@pytest.mark.parametrize("datatype, low, high", INTEGER_RANGES, ids=[entry[0] for entry in INTEGER_RANGES])
@pytest.mark.parametrize("count", [2, 200], ids=["short", "long"])  # numpy's path and the array module's
def test_integer_values_out_of_range_are_refused_and_the_limits_kept(http, datatype, low, high, count):
    for value in (low - 1, high + 1):
        data = [value] + [0] * (count - 1)
        response = http.post(ECHO, json={"inputs": [tensor("a", datatype, [count], data)]})
        assert_error(response, 400, f"out of range for {datatype}")
    data = [low, high] * (count // 2)
    response = http.post(ECHO, json={"inputs": [tensor("a", datatype, [count // 2, 2], [data[i:i + 2] for i in range(0, count, 2)])]})
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == data


# Long data takes the array module past 64 values, and simdjson's parse from 4 KB of JSON
# (codecs/numpy.py, server/binary.py): every check must hold on each path.
LONG = [200, 4000]


@pytest.mark.parametrize("length", LONG)
@pytest.mark.parametrize("datatype, data, fragment", [
    ("FP32", lambda n: [1.5] * (n - 1) + ["a"], "FP32 data must be numbers"),
    ("FP32", lambda n: [True] * n, "FP32 data must be numbers, got True"),
    ("FP64", lambda n: [1.5] * (n - 1) + [None], "FP64 data must be numbers"),
    ("FP32", lambda n: [1e300] * n, "out of range for FP32"),
    ("FP16", lambda n: [1.0] * (n - 1) + [1e6], "out of range for FP16"),
    ("INT32", lambda n: [1] * (n - 1) + [1.5], "INT32 data must be integers"),
    ("INT8", lambda n: [1] * (n - 1) + [128], "out of range for INT8"),
    ("INT64", lambda n: [True] * n, "INT64 data must be integers, got True"),
    ("INT64", lambda n: [1] * (n - 1) + [2**63], "out of range for INT64"),
    ("UINT64", lambda n: [1] * (n - 1) + [-1], "out of range for UINT64"),
    ("FP32", lambda n: [1.5] * (n - 1) + [[1.5]], "ragged"),
    ("FP32", lambda n: [[1.5] * (n // 2), [1.5] * (n // 2 - 1) + [[1.5]]], "ragged"),
    ("INT32", lambda n: [[1] * (n // 2), [1] * (n // 2 - 1) + [[1]]], "ragged"),
    ("INT32", lambda n: [[1] * (n // 2), [1] * (n // 2 - 1)], "ragged"),
    ("INT32", lambda n: [[1] * (n // 4 + 1), [1] * (n // 4 - 1), [1] * (n // 4), [1] * (n // 4)], "ragged"),
    ("FP32", lambda n: [[[1.5] * (n // 2)], [1.5] * (n // 2)], "ragged"),
    ("FP32", lambda n: [[1.5] * (n // 2), [[]] + [1.5] * (n // 2 - 1) + [[1.5, 1.5]]], "ragged"),
    ("BYTES", lambda n: [["a"] * (n // 2), ["b"] * (n // 2 - 1)], "ragged"),
])
def test_long_data_is_checked_as_strictly_as_short(http, length, datatype, data, fragment):
    response = http.post(ECHO, json={"inputs": [tensor("a", datatype, [length], data(length))]})
    assert_error(response, 400, fragment)


SHAPES = {"n": lambda n: [n], "1xn": lambda n: [1, n], "4xn/4": lambda n: [4, n // 4], "2x2xn/4": lambda n: [2, 2, n // 4]}


@pytest.mark.parametrize("length", LONG)
@pytest.mark.parametrize("datatype", ["FP16", "FP32", "FP64", "INT8", "UINT16", "INT64", "UINT64", "BOOL", "BYTES"])
@pytest.mark.parametrize("shape", SHAPES)
def test_long_data_flat_or_nested_comes_back_exact(http, length, datatype, shape):
    shape = SHAPES[shape](length)
    rng = np.random.default_rng(7)
    if datatype == "BYTES":
        values = np.array([f"s{i}" for i in range(length)], dtype=object)
    elif datatype == "BOOL":
        values = rng.random(length) > 0.5
    elif datatype.startswith("FP"):
        values = rng.standard_normal(length).astype(datatype.lower().replace("fp", "float"))
    else:
        info = np.iinfo(datatype.lower())
        values = rng.integers(info.min, info.max, length, dtype=datatype.lower(), endpoint=True)
    values = values.reshape(shape)
    response = http.post(ECHO, json={"inputs": [tensor("a", datatype, shape, values.tolist())]})
    assert response.status_code == 200, response.text
    [output] = response.json()["outputs"]
    assert output["shape"] == shape and output["datatype"] == datatype
    # orjson writes a float32 as its shortest text, which reads back as that float32 only.
    assert np.array_equal(np.array(output["data"], dtype=values.dtype), values.ravel())


BIG = 2000  # values: bodies well past the 4 KB from which simdjson reads them


def big_values(count: int = BIG) -> str:
    return ",".join(f"{i}.5" for i in range(count))


@pytest.mark.parametrize("body, expected", [
    # simdjson's lookup takes a repeated key's first value, orjson its last: the last wins.
    ('{"inputs":[{"name":"a","datatype":"INT64","shape":[%d],"datatype":"FP64","data":[%s]}]}' % (BIG, big_values()),
     [i + 0.5 for i in range(BIG)]),
    ('{"inputs":[{"name":"a","datatype":"FP64","shape":[%d],"data":[%s]}],'
     '"inputs":[{"name":"a","datatype":"FP64","shape":[1],"data":[7]}]}' % (BIG, big_values()), [7.0]),
    # A '[' inside a string is no array, though a count of the body's brackets sees one.
    ('{"parameters":{"note":"[x"},"inputs":[{"name":"a","datatype":"FP64","shape":[%d],"data":[%s]}]}' % (BIG, big_values()),
     [i + 0.5 for i in range(BIG)]),
    # NaN and Infinity are no JSON, but tritonclient sends them.
    ('{"inputs":[{"name":"a","datatype":"FP64","shape":[%d],"data":[%s,NaN]}]}' % (BIG + 1, big_values()),
     [i + 0.5 for i in range(BIG)] + [np.nan]),
    # Python's json reads a number past FP64 as infinity: so do both paths.
    ('{"inputs":[{"name":"a","datatype":"FP64","shape":[%d],"data":[%s,1e400]}]}' % (BIG + 1, big_values()),
     [i + 0.5 for i in range(BIG)] + [np.inf]),
    # More rows than are walked one by one.
    ('{"inputs":[{"name":"a","datatype":"FP64","shape":[%d,1],"data":[%s]}]}'
     % (5000, ",".join(f"[{i}.5]" for i in range(5000))), [i + 0.5 for i in range(5000)]),
    ('{"inputs":[{"name":"a","datatype":"INT64","shape":[%d],"data":[%s]}],"padding":"%s"}' % (2, "1,2", "x" * 5000), [1, 2]),
    ('{"inputs":[{"name":"a","datatype":"INT64","shape":[1],"data":5}],"padding":"%s"}' % ("x" * 5000), [5]),
], ids=["repeated-datatype-key", "repeated-inputs-key", "bracket-in-a-string", "nan", "past-fp64", "many-rows", "small-data",
        "scalar-data"])
def test_big_json_reads_as_small_json_does(http, body, expected):
    response = http.post(ECHO, content=body.encode())
    assert response.status_code == 200, response.text
    np.testing.assert_array_equal(response.json()["outputs"][0]["data"], expected)


@pytest.mark.parametrize("body, status, fragment", [
    # An array hidden among the numbers: the brackets are counted, and an escaped one counts for none.
    ('{"parameters":{"note":"\\u005b"},"inputs":[{"name":"a","datatype":"FP64","shape":[%d],"data":[%s,[1]]}]}'
     % (BIG + 1, big_values()), 400, "ragged"),
    ('{"inputs":[{"name":"a","datatype":"FP64","shape":[%d],"data":%s}],"padding":"%s"}'
     % (1, nested(33, "1"), "x" * 5000), 400, "nested deeper than 32"),
    ('{"parameters":{"deep":%s},"inputs":[{"name":"a","datatype":"FP64","shape":[%d],"data":[%s]}]}'
     % (nested(150), BIG, big_values()), 400, DEPTH_ERROR),
    ('{"inputs":{"name":"a","datatype":"FP64","shape":[%d],"data":[%s]}}' % (BIG, big_values()), 400, "needs 'inputs', a list"),
    ('{"inputs":[{"name":"a","datatype":"FP64","shape":[%d],"data":{"x":[%s]}}]}' % (BIG, big_values()), 400,
     f"needs {BIG} elements, data has 1"),
    ('{"inputs":[{"name":"a","datatype":"FP64","shape":[%d],"data":[%s]}]}' % (BIG + 1, big_values()), 400, f"needs {BIG + 1} elements, data has {BIG}"),
    ('{"inputs":[{"name":"a","datatype":"FP32","shape":[%d],"data":[%s]}]} trailing' % (BIG, big_values()), 400, "malformed JSON"),
    ('{"inputs":[{"name":"a","datatype":[],"shape":[%d],"data":[%s]}]}' % (BIG, big_values()), 400, "unknown datatype"),
], ids=["escaped-bracket-hides-nothing", "data-33-deep", "parameters-150-deep", "inputs-not-a-list", "data-an-object",
        "count-differs", "trailing-text", "datatype-a-list"])
def test_big_json_is_refused_as_small_json_is(http, body, status, fragment):
    assert_error(http.post(ECHO, content=body.encode()), status, fragment)
    assert_iris_serves(http)


def test_big_json_beside_binary_inputs(http):
    blob = np.arange(3, dtype=np.int32).tobytes()
    body, headers = binary([{"name": "a", "datatype": "INT32", "shape": [3], "parameters": {"binary_data_size": len(blob)}},
                            {"name": "b", "datatype": "FP64", "shape": [BIG], "data": [i + 0.5 for i in range(BIG)]}], blob)
    response = http.post(ECHO, content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert [output["data"] for output in response.json()["outputs"]] == [[0, 1, 2], [i + 0.5 for i in range(BIG)]]


def test_a_tensor_of_32_dimensions_is_accepted(http):
    response = http.post(ECHO, json={"inputs": [tensor("a", "INT32", [1] * 32, json.loads(nested(32, "7")))]})
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["shape"] == [1] * 32 and response.json()["outputs"][0]["data"] == [7]


def test_traversal_in_raw_paths_touches_no_file(server, repository, http):
    """Dot segments sent as they are (clients normalize them): nothing outside the repository loads."""
    outside = repository.parent / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "model-settings.json").write_text(json.dumps({"name": "outside", "implementation": "sklearn"}))
    for path in ("/v2/repository/models/../load", "/v2/repository/models/../outside/load",
                 "/v2/repository/models/..%2Foutside/load", "/v2/repository/models/%2e%2e%2foutside/load",
                 "/v2/models/../outside/infer", "/v2/models/iris/versions/../infer"):
        status, body = raw_post(server.http_address, path)
        assert 400 <= status < 500 and "error" in json.loads(body), (path, status, body)
    names = {entry["name"] for entry in http.post("/v2/repository/index").json()}
    assert "outside" not in names and ".." not in names
    assert_iris_serves(http)


def raw_post(address: str, path: str) -> tuple[int, bytes]:
    host, port = address.split(":")
    connection = HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("POST", path, body=b"{}", headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_metrics_port_answers_json_errors(server):
    response = httpx.get(f"http://127.0.0.1:{server.metrics_port}/nothing-here")
    assert_error(response, 404, "Not Found")


def test_oversized_body_limit_applies_before_decoding(http):
    """One body past the limit, after each of the bombs above, still gets 413 and no more."""
    response = http.post(ECHO, content=bytes(MAX_MESSAGE_SIZE + 1))
    assert_error(response, 413, "exceeds the limit")
    assert_iris_serves(http)


# gRPC.


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.grpc_address) as channel:
        yield channel


def assert_grpc_serves(server) -> None:
    client = grpcclient.InferenceServerClient(url=server.grpc_address)
    try:
        features = grpcclient.InferInput("input-0", list(IRIS_ROWS.shape), "FP32")
        features.set_data_from_numpy(IRIS_ROWS)
        assert client.infer("iris", [features]).as_numpy("predict").tolist() == IRIS_CLASSES
    finally:
        client.close()


# Every unary RPC the server implements (the rest answer UNIMPLEMENTED, whatever is sent).
UNARY_METHODS = [method.name for method in service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods
                 if not method.client_streaming and method.name in vars(InferenceService)]


@pytest.mark.parametrize("method", UNARY_METHODS)
def test_grpc_bytes_that_are_no_message_are_invalid_argument(server, channel, method):
    call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")  # no serializer: bytes go as they are
    with pytest.raises(grpc.RpcError) as raised:
        call(b"\xff\xff\xff\xff not a protobuf message", timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
    assert "the request bytes are not a valid inference." in raised.value.details()
    assert "class" not in raised.value.details()
    assert_grpc_serves(server)


def test_grpc_stream_answers_undecodable_bytes_in_the_stream_and_goes_on(server, channel):
    stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
    good = service_pb2.ModelInferRequest(model_name="echo", inputs=[infer_input("a", "INT32", [1], int_contents=[5])])
    answers = [service_pb2.ModelStreamInferResponse.FromString(raw)
               for raw in stream(iter([b"\xff\xff\xff", good.SerializeToString()]), timeout=30)]
    assert "not a valid inference.ModelInferRequest" in answers[0].error_message
    assert answers[1].error_message == "" and answers[1].infer_response.raw_output_contents == [struct.pack("<i", 5)]


def infer_input(name: str, datatype: str, shape: list[int], **contents) -> service_pb2.ModelInferRequest.InferInputTensor:
    entry = service_pb2.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)
    for field_name, values in contents.items():
        getattr(entry.contents, field_name).extend(values)
    return entry


def echo_request(*inputs, raw: list[bytes] | None = None, outputs: list[str] = ()) -> service_pb2.ModelInferRequest:
    message = service_pb2.ModelInferRequest(model_name="echo", inputs=list(inputs), raw_input_contents=raw or [])
    for name in outputs:
        message.outputs.add(name=name)
    return message


ONE_INT32 = [struct.pack("<i", 1)]

GRPC_CASES = {
    "int8-300-in-int-contents": (echo_request(infer_input("a", "INT8", [1], int_contents=[300])), "out of range for INT8"),
    "int8-minus-129": (echo_request(infer_input("a", "INT8", [1], int_contents=[-129])), "out of range for INT8"),
    "int16-40000": (echo_request(infer_input("a", "INT16", [1], int_contents=[40000])), "out of range for INT16"),
    "uint8-256-in-uint-contents": (echo_request(infer_input("a", "UINT8", [1], uint_contents=[256])), "out of range for UINT8"),
    "uint16-70000": (echo_request(infer_input("a", "UINT16", [1], uint_contents=[70000])), "out of range for UINT16"),
    "int8-out-of-range-long": (echo_request(infer_input("a", "INT8", [200], int_contents=[1] * 199 + [128])),
                               "out of range for INT8"),
    "shape-element-count-overflows": (echo_request(infer_input("a", "INT32", [2**4, 2**60 + 2]), raw=ONE_INT32), "too large"),
    "shape-negative": (echo_request(infer_input("a", "INT32", [-1]), raw=ONE_INT32), "non-negative integers"),
    "shape-64-dimensions-raw": (echo_request(infer_input("a", "INT32", [1] * 64), raw=ONE_INT32), "at most 32"),
    "shape-64-dimensions-typed": (echo_request(infer_input("a", "INT32", [1] * 64, int_contents=[1])), "at most 32"),
    "duplicate-inputs": (echo_request(infer_input("a", "INT32", [1]), infer_input("a", "INT32", [1]), raw=ONE_INT32 * 2),
                         "names inputs ['a'] more than once"),
    "duplicate-outputs": (echo_request(infer_input("a", "INT32", [1]), raw=ONE_INT32, outputs=["output-0", "output-0"]),
                          "more than once"),
    "absent-output": (echo_request(infer_input("a", "INT32", [1]), raw=ONE_INT32, outputs=["nope"]), "has no output 'nope'"),
    "bytes-prefix-runs-past-the-buffer": (echo_request(infer_input("a", "BYTES", [1]), raw=[struct.pack("<I", 2**31) + b"x"]),
                                          "past the end"),
}


@pytest.mark.parametrize("message, fragment", GRPC_CASES.values(), ids=GRPC_CASES.keys())
def test_hostile_grpc_request_is_invalid_argument(server, channel, message, fragment):
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelInfer(message, timeout=30)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
    assert fragment in raised.value.details()
    assert_grpc_serves(server)


def test_grpc_model_unavailable_is_unavailable(server, channel):
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    with pytest.raises(grpc.RpcError) as raised:
        stub.ModelInfer(service_pb2.ModelInferRequest(model_name="bad-load", inputs=[infer_input("a", "INT32", [1])], raw_input_contents=ONE_INT32),
                        timeout=30)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE and "corrupt" in raised.value.details()
    assert_grpc_serves(server)


def test_rest_model_unavailable_is_503(http):
    assert_error(http.post("/v2/models/bad-load/infer", json=iris_json()), 503, "weights file is corrupt")
    assert_error(http.get("/v2/models/bad-load/ready"), 503, "corrupt")
    assert_iris_serves(http)
