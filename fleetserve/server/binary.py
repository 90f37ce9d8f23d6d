"""REST bodies: V2 JSON, with Triton's binary tensor data extension in and out.

Whether a body carries binary tensors is decided by the `Inference-Header-Content-Length`
header alone (tritonclient.http sends binary bodies without a Content-Type). Binary inputs are
read with `np.frombuffer`, without copying.
"""

from __future__ import annotations

import json
import reprlib
from typing import Any

import numpy as np
import orjson
import simdjson

from fleetserve.codecs import as_plain
from fleetserve.codecs.numpy import (
    SIMDJSON_DATATYPES, array_from_buffer, array_from_json, array_from_simdjson, array_to_buffer, bytes_to_text,
    little_endian,
)
from fleetserve.errors import InvalidInput
from fleetserve.types import (
    MAX_DIMS, MAX_NESTING, InferenceRequest, InferenceResponse, RequestedOutput, Tensor, check_nesting,
)

HEADER_LENGTH = "inference-header-content-length"
_TOO_DEEP = f"JSON nesting depth exceeds the limit of {MAX_NESTING}"
_SHALLOW = 2 * MAX_NESTING  # a level takes two characters: no body this short can nest too deeply


def _parameters(raw: dict, kind: str, name: str = "") -> dict[str, Any]:
    parameters = raw.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        where = f"{kind} '{name}'" if name else kind
        raise InvalidInput(f"{where}: 'parameters' must be an object")
    return parameters


def parse_json_object(body: bytes) -> dict:
    """A JSON object, nested at most MAX_NESTING deep."""
    document = _json_object(body)
    if len(body) > _SHALLOW and _may_nest_too_deeply(body, len(body)):
        check_nesting(document)
    return document


def refuse_deep_json(body: bytes) -> None:
    """For JSON another library parses (MLflow's scoring protocol): refused nested past MAX_NESTING.
    What does not parse is left for that library to word."""
    if len(body) <= _SHALLOW or not _may_nest_too_deeply(body, len(body)):
        return
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        try:
            document = _json_with_non_finite_numbers(body, error)
        except InvalidInput as refused:
            if refused.message == _TOO_DEEP:
                raise
            return
    if type(document) is list or type(document) is dict:
        check_nesting(document)


def _json_object(body: bytes | memoryview) -> dict:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        document = _json_with_non_finite_numbers(body, error)
    if not isinstance(document, dict):
        raise InvalidInput("the request body must be a JSON object")
    return document


def _may_nest_too_deeply(body: bytes, end: int) -> bool:
    """Whether body[:end] could nest past MAX_NESTING: the brackets and braces that open in it,
    counted at C speed, bound its depth. Only a body that could is walked."""
    return body.count(b"[", 0, end) + body.count(b"{", 0, end) > MAX_NESTING


def _json_with_non_finite_numbers(body: bytes | memoryview, error: orjson.JSONDecodeError) -> Any:
    """NaN and Infinity are not JSON, but tritonclient and Python's json send them: accept them."""
    if error.msg.startswith("depth limit"):  # orjson stops at 1024 levels; json.loads would recurse
        raise InvalidInput(_TOO_DEEP)
    try:
        return json.loads(bytes(body))
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput(f"malformed JSON: {error}") from None
    except RecursionError:
        raise InvalidInput(_TOO_DEEP) from None


def _check_request_nesting(document: dict) -> None:
    """check_nesting for a V2 request, less its tensors' data: array_from_json bounds that at
    MAX_DIMS levels, without walking every number."""
    for key, value in document.items():
        if key == "inputs" and type(value) is list:
            for raw in value:
                if type(raw) is dict:
                    for part, item in raw.items():
                        if part != "data" and (type(item) is list or type(item) is dict):
                            check_nesting(item, depth=4)
                elif type(raw) is list:
                    check_nesting(raw, depth=3)
        elif type(value) is list or type(value) is dict:
            check_nesting(value, depth=2)


# From this size on, a JSON body is parsed by simdjson, and its numeric tensors go to numpy in C
# (Array.as_buffer), never a Python number per element: past a few KB that is 2-4x faster than
# orjson and the array module (262,144 FP32 values, 1.8 MB: 13 ms -> 3.3 ms).
SIMDJSON_FROM = 4096
_WALK_LIMIT = 4096  # nested data holding more arrays than this is left to the exact path
_OPEN_BRACKET = ord("[")


def _simdjson_request(header: bytes | memoryview) -> dict | None:
    """The request as _json_object reads it, except that each numeric tensor's `data` stays a
    simdjson.Array, known to be rectangular, for array_from_simdjson.

    None where the exact path must read the body instead: JSON simdjson refuses (NaN and
    Infinity among it), a repeated key, data of another datatype, data that is ragged, nested too
    deeply or in too many rows. As as_buffer flattens whatever nesting it meets, the arrays are
    counted: the body's '[' must be exactly the arrays the request is known to hold, or an array
    could hide among a tensor's numbers. (A '[' inside a string makes the count too high, never
    right: such a body takes the exact path.)
    """
    try:
        root = simdjson.Parser().parse(header)
    except Exception:  # ValueError, RuntimeError (too deep), ...: the exact path words it
        return None
    if type(root) is not simdjson.Object or (document := _fields(root, "inputs")) is None:
        return None
    raw_inputs = document.get("inputs")
    if type(raw_inputs) is not simdjson.Array:
        return None
    arrays = 1 + _arrays_in({key: value for key, value in document.items() if key != "inputs"})
    inputs = []
    for raw in raw_inputs:
        tensor = _fields(raw, "data") if type(raw) is simdjson.Object else None
        if tensor is None:
            return None
        data = tensor.get("data")
        if type(data) is simdjson.Array:
            datatype = tensor.get("datatype")
            held = _rectangular(data) if type(datatype) is str and datatype in SIMDJSON_DATATYPES else None
        else:
            held = 0 if type(data) is not simdjson.Object else None
        if held is None:
            return None
        arrays += held + _arrays_in({key: value for key, value in tensor.items() if key != "data"})
        inputs.append(tensor)
    if np.count_nonzero(np.frombuffer(header, np.uint8) == _OPEN_BRACKET) != arrays:
        return None
    document["inputs"] = inputs
    return document


def _fields(lazy: simdjson.Object, kept: str) -> dict | None:
    """An object's fields as Python values, but for `kept`, left as simdjson gives it; None when a
    key repeats (orjson keeps a repeated key's last value, simdjson's lookup its first)."""
    keys = list(lazy.keys())
    if len(set(keys)) != len(keys):
        return None
    return {key: lazy[key] if key == kept else _plain(lazy[key]) for key in keys}


def _plain(value: Any) -> Any:
    if type(value) is simdjson.Object:
        return value.as_dict()
    if type(value) is simdjson.Array:
        return value.as_list()
    return value


def _arrays_in(value: Any) -> int:
    """How many arrays a JSON value holds."""
    count, stack = 0, [value]
    while stack:
        value = stack.pop()
        if type(value) is list:
            count += 1
            stack.extend(value)
        elif type(value) is dict:
            stack.extend(value.values())
    return count


def _rectangular(data: simdjson.Array) -> int | None:
    """How many arrays rectangular nested data holds (1 when flat), read off every array but no
    number; None when it is ragged, nested past MAX_DIMS, or holds more than _WALK_LIMIT arrays.
    Arrays among the innermost numbers are not seen here: the caller's count of '[' finds them."""
    level, count, depth = [data], 1, 1
    while True:
        width = len(level[0])
        if width == 0 or type(level[0][0]) is not simdjson.Array:
            return count if all(len(array) == width for array in level) else None
        depth += 1
        count += len(level) * width
        if depth > MAX_DIMS or count > _WALK_LIMIT:
            return None
        below = []
        for array in level:
            if len(array) != width:
                return None
            for child in array:
                if type(child) is not simdjson.Array:
                    return None
                below.append(child)
        level = below


def decode_request(body: bytes, header_length: str | None) -> InferenceRequest:
    binary: memoryview | None = None
    header: bytes | memoryview = body
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            raise InvalidInput(f"Inference-Header-Content-Length must be an integer, got {header_length!r}") from None
        if not 0 <= length <= len(body):
            raise InvalidInput(f"Inference-Header-Content-Length {length} is outside the body of {len(body)} bytes")
        view = memoryview(body)
        header, binary = view[:length], view[length:]
    document = _simdjson_request(header) if len(header) >= SIMDJSON_FROM else None
    if document is not None:
        _check_request_nesting(document)
    else:
        document = _json_object(header)
        if len(header) > _SHALLOW and _may_nest_too_deeply(body, len(header)):
            _check_request_nesting(document)
    raw_inputs = document.get("inputs")
    if not isinstance(raw_inputs, list):
        raise InvalidInput("the request needs 'inputs', a list of tensors")
    offset = 0
    inputs = []
    for raw in raw_inputs:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise InvalidInput(f"each input must be an object with a 'name', got {_short(raw)}")
        name = raw["name"]
        parameters = _parameters(raw, "input", name)
        datatype, shape = raw.get("datatype"), raw.get("shape")
        size = parameters.get("binary_data_size")
        if size is not None:
            if binary is None:
                raise InvalidInput(f"input '{name}' has binary_data_size but the request has no Inference-Header-Content-Length")
            if type(size) is not int or size < 0:  # bool is not int here, as it must not be
                raise InvalidInput(f"input '{name}': binary_data_size must be a non-negative integer")
            if offset + size > len(binary):
                raise InvalidInput(
                    f"input '{name}': binary data is truncated: needs {size} bytes at offset {offset}, "
                    f"the body has {len(binary)} bytes of binary data"
                )
            data = array_from_buffer(binary[offset : offset + size], datatype, shape, name)
            offset += size
            parameters = {key: value for key, value in parameters.items() if key != "binary_data_size"}
        elif type(raw.get("data")) is simdjson.Array:
            data = array_from_simdjson(raw["data"], datatype, shape, name)
        elif "data" in raw:
            data = array_from_json(raw["data"], datatype, shape, name)
        else:
            raise InvalidInput(f"input '{name}' has neither 'data' nor binary_data_size")
        inputs.append(Tensor(name, data, parameters))
    if binary is not None and offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data are left over after the inputs")
    raw_outputs = document.get("outputs")
    if raw_outputs is None:
        raw_outputs = []
    elif not isinstance(raw_outputs, list):
        raise InvalidInput(f"'outputs' must be a list of requested outputs, got {_short(raw_outputs)}")
    outputs = []
    for raw in raw_outputs:
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise InvalidInput(f"each requested output must be an object with a 'name', got {_short(raw)}")
        outputs.append(RequestedOutput(raw["name"], _parameters(raw, "output", raw["name"])))
    request_id = document.get("id")
    return InferenceRequest(
        inputs=inputs,
        id=None if request_id is None else str(request_id),
        parameters=_parameters(document, "request"),
        outputs=outputs,
    )


def _short(value: Any) -> str:
    text = reprlib.repr(value)  # bounded: a value may be huge, or nested too deeply for repr()
    return text if len(text) <= 80 else text[:77] + "..."


def encode_response(response: InferenceResponse, request: InferenceRequest) -> tuple[bytes, int | None]:
    """The body, and the JSON header's length when binary outputs follow it (else None)."""
    binary_default = bool(request.parameters.get("binary_data_output", False))
    asked = {output.name: output.parameters for output in request.outputs}
    outputs = []
    blobs = []
    any_binary = False
    non_finite = False
    for tensor in response.outputs:
        datatype = tensor.datatype
        entry: dict[str, Any] = {"name": tensor.name, "datatype": datatype, "shape": list(tensor.shape)}
        parameters = dict(tensor.parameters)
        output_parameters = asked.get(tensor.name)
        if output_parameters.get("binary_data", binary_default) if output_parameters else binary_default:
            blob = array_to_buffer(tensor.data)
            parameters["binary_data_size"] = len(blob)
            blobs.append(blob)
            any_binary = True
        elif datatype == "BYTES":
            try:
                entry["data"] = bytes_to_text(tensor.data)
            except UnicodeDecodeError:
                raise InvalidInput(
                    f"output '{tensor.name}' holds bytes that are not UTF-8 text; ask for it as binary data"
                ) from None
        elif tensor.data.dtype.kind == "f" and not np.isfinite(tensor.data).all():
            entry["data"] = tensor.data.ravel().tolist()
            non_finite = True
        else:
            entry["data"] = little_endian(tensor.data).ravel()
        if parameters:
            entry["parameters"] = parameters
        outputs.append(entry)
    document: dict[str, Any] = {"model_name": response.model_name}
    if response.model_version is not None:
        document["model_version"] = response.model_version
    if response.id is not None:
        document["id"] = response.id
    if response.parameters:
        document["parameters"] = response.parameters
    document["outputs"] = outputs
    if non_finite:
        # orjson writes NaN and Infinity as null; Python's json writes the literals Triton sends
        # and Python clients read.
        header = json.dumps(document, separators=(",", ":"), default=as_plain).encode()
    else:
        header = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    if not any_binary:
        return header, None
    return b"".join([header, *blobs]), len(header)
