"""Wire data <-> numpy arrays: JSON lists, raw little-endian buffers, length-prefixed BYTES.

Both front doors (REST JSON, REST binary, gRPC typed and raw contents) decode through here, so
every tensor is checked the same way: datatype known, element count equal to the shape, no
strings where numbers belong, values inside the datatype's range.
"""

from __future__ import annotations

import math
import struct
import warnings
from typing import Any

import numpy as np

from fleetserve.errors import InvalidInput
from fleetserve.types import check_datatype, check_shape

# Out-of-range floats are refused below; numpy's own warning about the cast would only be noise.
# (np.errstate would silence it too, at a cost on every request.)
warnings.filterwarnings("ignore", message="overflow encountered in cast", category=RuntimeWarning, module=__name__)

# The JSON value kinds each datatype accepts ("b" bool, "i"/"u" integer, "f" float).
_ACCEPTED = {"BOOL": ("bi", "booleans"), "FP16": ("iuf", "numbers"), "FP32": ("iuf", "numbers"), "FP64": ("iuf", "numbers")}
_INTEGERS = ("iu", "integers")
_INTEGER_KINDS = _INTEGERS[0]


def element_count(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def array_from_json(data: Any, datatype: str, shape: Any, name: str) -> np.ndarray:
    """A JSON `data` value (flat or nested) as an array of the declared datatype and shape."""
    dtype = check_datatype(datatype, name)
    shape = check_shape(shape, name)
    if not isinstance(data, list):
        data = [data]
    if datatype == "BYTES":
        return _bytes_from_json(data, shape, name)
    try:
        parsed = np.array(data)
    except ValueError:
        raise InvalidInput(f"tensor '{name}': data is ragged; nested lists must be rectangular") from None
    if dtype.kind in _INTEGER_KINDS and parsed.dtype.kind in "fO" and all(type(v) is int for v in _flatten(data)):
        # Integers beyond int64 (large UINT64 values) make numpy fall back to float or object.
        parsed = _big_integers(data, dtype, name)
    if parsed.size != element_count(shape):
        raise InvalidInput(
            f"tensor '{name}': shape {list(shape)} needs {element_count(shape)} elements, data has {parsed.size}"
        )
    kinds, words = _ACCEPTED.get(datatype, _INTEGERS)
    if parsed.size and parsed.dtype.kind not in kinds:
        raise InvalidInput(f"tensor '{name}': {datatype} data must be {words}, got {_sample(data)}")
    if dtype.kind in _INTEGER_KINDS and parsed.size:
        info = np.iinfo(dtype)
        if parsed.min() < info.min or parsed.max() > info.max:
            raise InvalidInput(f"tensor '{name}': a value is out of range for {datatype}")
    array = parsed.astype(dtype, copy=False)
    # A value too large for FP16/FP32 casts to infinity: refused, unless it was infinity already.
    if array.dtype != parsed.dtype and dtype.kind == "f" and not _all_finite(array):
        if np.any(np.isinf(array) & np.isfinite(parsed)):
            raise InvalidInput(f"tensor '{name}': a value is out of range for {datatype}")
    return array.reshape(shape)


def _all_finite(array: np.ndarray) -> bool:
    if array.size <= 32:  # a ufunc's fixed cost is ten times a short Python sum's
        return math.isfinite(sum(array.ravel().tolist()))  # any inf or nan makes the sum one
    return bool(np.isfinite(array).all())


def _big_integers(data: list, dtype: np.dtype, name: str) -> np.ndarray:
    try:
        return np.array(data, dtype=dtype)
    except (OverflowError, ValueError, TypeError):
        raise InvalidInput(f"tensor '{name}': a value is not an integer in range for {dtype.name.upper()}") from None


def _bytes_from_json(data: list, shape: tuple[int, ...], name: str) -> np.ndarray:
    flat = _flatten(data)
    if len(flat) != element_count(shape):
        raise InvalidInput(
            f"tensor '{name}': shape {list(shape)} needs {element_count(shape)} elements, data has {len(flat)}"
        )
    array = np.empty(len(flat), dtype=object)
    for index, item in enumerate(flat):
        if isinstance(item, str):
            array[index] = item.encode()
        elif isinstance(item, bytes):
            array[index] = item
        else:
            raise InvalidInput(f"tensor '{name}': BYTES data must be strings, got {item!r}")
    return array.reshape(shape)


def _flatten(data: list) -> list:
    if not any(isinstance(item, list) for item in data):
        return data
    flat: list = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _sample(data: list) -> str:
    flat = _flatten(data)
    return repr(flat[0]) if len(flat) == 1 else f"{flat[0]!r}, ..."


def array_from_buffer(buffer: bytes | memoryview, datatype: str, shape: Any, name: str) -> np.ndarray:
    """A raw little-endian buffer as an array, without copying (read-only view)."""
    dtype = check_datatype(datatype, name)
    shape = check_shape(shape, name)
    if datatype == "BYTES":
        return bytes_from_buffer(buffer, shape, name)
    expected = element_count(shape) * dtype.itemsize
    if len(buffer) != expected:
        raise InvalidInput(
            f"tensor '{name}': shape {list(shape)} of {datatype} needs {expected} bytes, got {len(buffer)}"
        )
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def bytes_from_buffer(buffer: bytes | memoryview, shape: tuple[int, ...], name: str) -> np.ndarray:
    """BYTES elements, each a 4-byte little-endian length then the bytes."""
    count = element_count(shape)
    view = memoryview(buffer)
    offset, end = 0, len(view)
    # Each element needs at least its length prefix: refuse before allocating `count` slots.
    if count * 4 > end:
        raise InvalidInput(
            f"tensor '{name}': BYTES data is truncated: shape {list(shape)} needs at least {count * 4} bytes "
            f"of length prefixes, got {end}"
        )
    array = np.empty(count, dtype=object)
    for index in range(count):
        if offset + 4 > end:
            raise InvalidInput(f"tensor '{name}': BYTES data is truncated at element {index} of {count}")
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + length > end:
            raise InvalidInput(f"tensor '{name}': BYTES element {index} claims {length} bytes past the end")
        array[index] = bytes(view[offset : offset + length])
        offset += length
    if offset != end:
        raise InvalidInput(f"tensor '{name}': {end - offset} bytes left over after {count} BYTES elements")
    return array.reshape(shape)


def bytes_to_buffer(array: np.ndarray) -> bytes:
    parts = []
    for item in array.flat:
        item = as_bytes(item)
        parts.append(struct.pack("<I", len(item)))
        parts.append(item)
    return b"".join(parts)


def little_endian(array: np.ndarray) -> np.ndarray:
    """The array contiguous and little-endian, as the wire (and orjson) want it; no copy if it already is."""
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array)


def array_to_buffer(array: np.ndarray) -> bytes | memoryview:
    if array.dtype.kind in "OSU":
        return bytes_to_buffer(array)
    return memoryview(little_endian(array)).cast("B")


def as_bytes(item: Any) -> bytes:
    if isinstance(item, bytes):
        return item
    if isinstance(item, str):
        return item.encode()
    return str(item).encode()


def bytes_to_text(array: np.ndarray) -> list[str]:
    """BYTES elements as str; raises UnicodeDecodeError for bytes that are not UTF-8."""
    return [item.decode() if isinstance(item, bytes) else str(item) for item in array.flat]
