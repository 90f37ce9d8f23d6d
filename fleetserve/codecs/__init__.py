"""Content-type codecs: how a runtime sees a tensor, and how its Python values become tensors.

Per tensor (`parameters.content_type`): `np` (the array as is), `str` (UTF-8 strings),
`base64` (bytes sent as base64 text), `datetime` (ISO 8601). Per request: `pd` (a pandas
DataFrame, one column per input). The wire format itself is handled in `codecs.numpy`.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import Any

import numpy as np

from fleetserve.codecs.numpy import as_bytes, bytes_to_text
from fleetserve.errors import InvalidInput
from fleetserve.types import InferenceRequest, Tensor

TENSOR_CONTENT_TYPES = ("np", "str", "base64", "datetime")
REQUEST_CONTENT_TYPES = ("np", "str", "pd")


def _text(tensor: Tensor) -> list[str]:
    try:
        return bytes_to_text(tensor.data)
    except UnicodeDecodeError as error:
        raise InvalidInput(f"tensor '{tensor.name}' holds invalid UTF-8 where text is needed: {error}") from None


def decode_tensor(tensor: Tensor, default: str = "np") -> Any:
    """The tensor as its content type asks: array, list of str, list of bytes or datetimes."""
    content_type = tensor.content_type or default
    if content_type == "np":
        return tensor.data
    if content_type == "str":
        return _text(tensor)
    if content_type == "base64":
        try:
            return [base64.b64decode(item, validate=True) for item in tensor.data.flat]
        except (binascii.Error, ValueError, TypeError):
            raise InvalidInput(f"tensor '{tensor.name}' is not valid base64") from None
    if content_type == "datetime":
        try:
            return [datetime.fromisoformat(text) for text in _text(tensor)]
        except ValueError as error:
            raise InvalidInput(f"tensor '{tensor.name}': {error}") from None
    raise InvalidInput(
        f"tensor '{tensor.name}': unknown content_type '{content_type}'; expected one of {TENSOR_CONTENT_TYPES}"
    )


def encode_tensor(name: str, value: Any, content_type: str | None = None) -> Tensor:
    """A response tensor from an array (kept as it is, content type `np`), a pandas Series, or a
    list of str, datetimes or bytes (content type `str`, `datetime` or none, unless one is given)."""
    if not isinstance(value, np.ndarray) and hasattr(value, "to_numpy"):
        value = value.to_numpy()
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "OSU":
            value = _object_array([as_bytes(item) for item in value.flat], value.shape)
        return Tensor(name, value, {"content_type": content_type or "np"})
    items = list(value)
    content_type = content_type or _guess_content_type(items)
    if content_type == "base64":
        items = [base64.b64encode(as_bytes(item)) for item in items]
    elif content_type == "datetime":
        items = [item.isoformat().encode() for item in items]
    else:
        items = [as_bytes(item) for item in items]
    parameters = {"content_type": content_type} if content_type else {}
    return Tensor(name, _object_array(items, (len(items),)), parameters)


def json_text(value: Any) -> str:
    """A framework's Python answer (dicts, lists, numpy or torch numbers) as JSON text."""
    return json.dumps(value, default=as_plain)


def as_plain(value: Any) -> Any:
    """What Python's json cannot write (numpy and torch values) as what it can: `default=as_plain`."""
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "tolist"):  # numpy arrays, torch tensors
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _object_array(items: list, shape: tuple[int, ...]) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array.reshape(shape)


def _guess_content_type(items: list) -> str | None:
    """`datetime` or `str` when every item is one; raw bytes are sent as they are."""
    if items and all(isinstance(item, datetime) for item in items):
        return "datetime"
    if all(isinstance(item, str) for item in items):
        return "str"
    return None


def decode_request(request: InferenceRequest, default: str = "np") -> Any:
    """The whole request as one value: a DataFrame (`pd`), one input's value, or a dict of them."""
    content_type = request.content_type or default
    if content_type == "pd":
        return to_dataframe(request)
    if content_type not in REQUEST_CONTENT_TYPES:
        raise InvalidInput(f"unknown request content_type '{content_type}'; expected one of {REQUEST_CONTENT_TYPES}")
    if len(request.inputs) == 1:
        return decode_tensor(request.inputs[0], content_type)
    return {tensor.name: decode_tensor(tensor, content_type) for tensor in request.inputs}


def to_dataframe(request: InferenceRequest):
    import pandas as pd

    columns = {}
    for tensor in request.inputs:
        value = decode_tensor(tensor, "str" if tensor.datatype == "BYTES" else "np")
        if isinstance(value, np.ndarray) and value.ndim == 2 and value.shape[1] == 1:
            value = value[:, 0]  # a column sent as [rows, 1]
        elif isinstance(value, np.ndarray) and value.ndim > 1:
            value = list(value)  # one row per first-dimension entry
        columns[tensor.name] = value
    try:
        return pd.DataFrame(columns)
    except ValueError as error:
        raise InvalidInput(f"inputs do not form a table: {error}") from None
