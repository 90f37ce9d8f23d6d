"""Wire data <-> numpy arrays: JSON lists, raw little-endian buffers, length-prefixed BYTES.

Both front doors (REST JSON, REST binary, gRPC typed and raw contents) decode through here, so
every tensor is checked the same way: datatype known, element count equal to the shape, no
strings where numbers belong, values inside the datatype's range.
"""

from __future__ import annotations

import array as pyarray
import math
import reprlib
import struct
import warnings
from itertools import chain
from typing import TYPE_CHECKING, Any

import numpy as np

from fleetserve.errors import InvalidInput
from fleetserve.types import MAX_DIMS, check_datatype, check_shape

if TYPE_CHECKING:
    import simdjson

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
    if type(data) is not list:
        data = [data]
    count = element_count(shape)
    if datatype == "BYTES":
        flat = _flat(data, name)
        if len(flat) != count:
            raise _count_error(name, shape, len(flat))
        return _bytes_from_json(flat, name).reshape(shape)
    parsed = _numbers(data, datatype, shape, name) if count > _FAST_FROM else None
    if parsed is None:  # numpy's discovery: the cheaper for short data, and what names a wrong value
        try:
            parsed = np.array(data)
        except ValueError:
            _rows(data, name)  # says what is wrong with the nesting: too deep, or ragged
            raise InvalidInput(f"tensor '{name}': data is ragged; nested lists must be rectangular") from None
        if parsed.size != count:
            raise _count_error(name, shape, parsed.size)
        if dtype.kind in _INTEGER_KINDS and parsed.dtype.kind in "fO" and all(type(v) is int for v in _flat(data, name)):
            # Integers beyond int64 (large UINT64 values) make numpy fall back to float or object.
            parsed = _big_integers(data, dtype, name)
        kinds, words = _ACCEPTED.get(datatype, _INTEGERS)
        if parsed.size and parsed.dtype.kind not in kinds:
            if dtype.kind in _INTEGER_KINDS and parsed.dtype.kind == "f" and _whole_past_64_bits(parsed):
                raise InvalidInput(f"tensor '{name}': a value is out of range for {datatype}")
            raise InvalidInput(f"tensor '{name}': {datatype} data must be {words}, got {_sample(_flat(data, name))}")
    return _in_range(parsed, dtype, datatype, shape, name)


def array_from_simdjson(data: simdjson.Array, datatype: str, shape: Any, name: str) -> np.ndarray:
    """Numeric `data` still inside simdjson's parse, nested rectangularly (the caller checked):
    flattened to a 64-bit array in C, with no Python number per element. Data that is not all
    numbers of the datatype's kind takes array_from_json, which words what is wrong."""
    dtype = check_datatype(datatype, name)
    shape = check_shape(shape, name)
    code = _ARRAY_CODES[datatype]
    try:
        parsed = np.frombuffer(data.as_buffer(of_type=_SIMDJSON_TYPES[code]), _CODE_DTYPES[code])
    except (TypeError, ValueError):  # a value of another kind, or past 64 bits
        return array_from_json(data.as_list(), datatype, shape, name)
    if parsed.size != element_count(shape):
        raise _count_error(name, shape, parsed.size)
    return _in_range(parsed, dtype, datatype, shape, name)


def _in_range(parsed: np.ndarray, dtype: np.dtype, datatype: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    """Parsed numbers cast to the datatype, refused where a value does not fit it."""
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


def _count_error(name: str, shape: tuple[int, ...], found: int) -> InvalidInput:
    return InvalidInput(f"tensor '{name}': shape {list(shape)} needs {element_count(shape)} elements, data has {found}")


def _rows(data: list, name: str) -> list[list]:
    """Nested data as its innermost lists, in row-major order, taken a level at a time (no Python
    loop per element); refused when ragged or nested deeper than an array can be."""
    rows = [data]
    dims = 1
    while rows[0] and type(rows[0][0]) is list:
        dims += 1
        if dims > MAX_DIMS:
            raise InvalidInput(f"tensor '{name}': data is nested deeper than {MAX_DIMS} levels, the most dimensions a tensor may have")
        level = rows[0] if len(rows) == 1 else list(chain.from_iterable(rows))
        if len(level) > 1 and (len(set(map(type, level))) != 1 or len(set(map(len, level))) != 1):
            raise InvalidInput(f"tensor '{name}': data is ragged; nested lists must be rectangular")
        rows = level
    return rows


def _flat(data: list, name: str) -> list:
    if not data or type(data[0]) is not list:
        return data
    rows = _rows(data, name)
    return rows[0] if len(rows) == 1 else list(chain.from_iterable(rows))


# Long data goes through the array module: it converts Python numbers, row by row, about twice as
# fast as numpy's discovery does, and refuses what is not a number of its kind (TypeError,
# OverflowError), which sends the data to numpy's discovery for the exact error.
_FAST_FROM = 64
_ARRAY_CODES = {"FP16": "d", "FP32": "d", "FP64": "d", "UINT64": "Q",
                **{datatype: "q" for datatype in ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32")}}
_CODE_DTYPES = {"d": np.dtype("<f8"), "q": np.dtype("<i8"), "Q": np.dtype("<u8")}
_SIMDJSON_TYPES = {"d": "d", "q": "i", "Q": "u"}  # Array.as_buffer's names for the same three
SIMDJSON_DATATYPES = frozenset(_ARRAY_CODES)


def _numbers(data: list, datatype: str, shape: tuple[int, ...], name: str) -> np.ndarray | None:
    """Long data of a numeric datatype as a 64-bit array, or None where numpy must look."""
    code = _ARRAY_CODES.get(datatype)
    if code is None or not data:
        return None
    rows = _rows(data, name) if type(data[0]) is list else [data]
    if len(rows) * len(rows[0]) != element_count(shape):
        raise _count_error(name, shape, len(rows) * len(rows[0]))
    # Booleans are numbers to the array module; an all-boolean list must be refused as before.
    if type(rows[0][0]) is bool:
        return None
    numbers = pyarray.array(code)
    try:
        for row in rows:  # row by row: no joined copy of the whole list
            numbers.fromlist(row)
    except (TypeError, OverflowError):
        return None
    return np.frombuffer(numbers, _CODE_DTYPES[code])


def _whole_past_64_bits(parsed: np.ndarray) -> bool:
    """Whole numbers too large for 64 bits: orjson reads such integers as floats."""
    return bool(np.all(np.floor(parsed) == parsed) and np.abs(parsed).max() >= 2.0**63)


def _all_finite(array: np.ndarray) -> bool:
    if array.size <= 32:  # a ufunc's fixed cost is ten times a short Python sum's
        return math.isfinite(sum(array.ravel().tolist()))  # any inf or nan makes the sum one
    return bool(np.isfinite(array).all())


def _big_integers(data: list, dtype: np.dtype, name: str) -> np.ndarray:
    try:
        return np.array(data, dtype=dtype)
    except (OverflowError, ValueError, TypeError):
        raise InvalidInput(f"tensor '{name}': a value is out of range for {dtype.name.upper()}") from None


def _bytes_from_json(flat: list, name: str) -> np.ndarray:
    array = np.empty(len(flat), dtype=object)
    for index, item in enumerate(flat):
        if isinstance(item, str):
            array[index] = item.encode()
        elif isinstance(item, bytes):
            array[index] = item
        else:
            raise InvalidInput(f"tensor '{name}': BYTES data must be strings, got {reprlib.repr(item)}")
    return array


def _sample(flat: list) -> str:
    # reprlib: a value may be huge, or nested too deeply for repr().
    return reprlib.repr(flat[0]) if len(flat) == 1 else f"{reprlib.repr(flat[0])}, ..."


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
