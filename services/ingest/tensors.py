"""Tensors of the Open Inference Protocol as numpy arrays: JSON data, raw bytes (the HTTP binary
tensor data extension and gRPC's `raw_*_contents`) and the classification extension.

Raw data is the flattened, row-major, little-endian array without padding; a BYTES tensor is each
element as a 4-byte little-endian length followed by its bytes (Triton's serialisation, which
its clients write and read). Every function here is pure and raises `TensorError` with a message
fit for the caller on bad input.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
"""Datatype name -> the numpy dtype of its elements (BYTES elements are `bytes`)."""

_LENGTH = struct.Struct("<I")


class TensorError(ValueError):
    """A tensor whose datatype, shape or data do not fit together."""


@dataclass(frozen=True, slots=True)
class Tensor:
    """A named tensor: its protocol datatype and its values, shaped."""

    name: str
    datatype: str
    values: np.ndarray

    @property
    def shape(self) -> list[int]:
        return list(self.values.shape)


def element_count(name: str, shape: list[int]) -> int:
    """The number of elements of `shape`; TensorError for a negative dimension."""
    if any(dim < 0 for dim in shape):
        raise TensorError(f"input '{name}': shape {shape} has a negative dimension")
    return math.prod(shape)


def dtype_of(name: str, datatype: str) -> np.dtype:
    try:
        return DTYPES[datatype]
    except KeyError:
        raise TensorError(f"tensor '{name}': unknown datatype {datatype}") from None


def flatten(data: list[Any]) -> list[Any]:
    """Row-major flattening of nested lists (the protocol allows both forms)."""
    while data and isinstance(data[0], list):
        data = list(chain.from_iterable(data))
    return data


def from_json(name: str, datatype: str, shape: list[int], data: list[Any]) -> Tensor:
    """A tensor from the JSON `data` of an HTTP request (flat or nested, row-major)."""
    dtype = dtype_of(name, datatype)
    count = element_count(name, shape)
    flat = flatten(data)
    if len(flat) != count:
        raise TensorError(
            f"input '{name}': shape {shape} holds {count} values, data has {len(flat)}"
        )
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in flat):
            raise TensorError(f"input '{name}': BYTES data must be strings")
        values = np.empty(count, dtype=object)
        values[:] = [v.encode() for v in flat]
    elif datatype == "BOOL":
        if not all(isinstance(v, bool) for v in flat):
            raise TensorError(f"input '{name}': BOOL data must be true or false")
        values = np.asarray(flat, dtype=dtype)
    else:
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in flat):
            raise TensorError(f"input '{name}': {datatype} data must be numbers")
        try:
            values = np.asarray(flat, dtype=dtype)
        except OverflowError:
            raise TensorError(f"input '{name}': a value does not fit {datatype}") from None
        if dtype.kind in "iu" and not all(isinstance(v, int) for v in flat):
            raise TensorError(f"input '{name}': {datatype} data must be integers")
    return Tensor(name, datatype, values.reshape(shape))


def from_raw(name: str, datatype: str, shape: list[int], raw: bytes) -> Tensor:
    """A tensor from its raw bytes; TensorError unless their size is exactly what the shape
    and datatype call for."""
    dtype = dtype_of(name, datatype)
    count = element_count(name, shape)
    if datatype == "BYTES":
        if count * _LENGTH.size > len(raw):  # before allocating for a claimed count
            raise TensorError(
                f"input '{name}': {len(raw)} bytes cannot hold {count} BYTES elements"
            )
        values = np.empty(count, dtype=object)
        offset = 0
        for i in range(count):
            if offset + 4 > len(raw):
                raise TensorError(f"input '{name}': raw BYTES data ends before element {i}")
            (length,) = _LENGTH.unpack_from(raw, offset)
            offset += 4
            if offset + length > len(raw):
                raise TensorError(f"input '{name}': raw BYTES element {i} runs past the data")
            values[i] = bytes(raw[offset : offset + length])
            offset += length
        if offset != len(raw):
            raise TensorError(
                f"input '{name}': {len(raw) - offset} bytes left after {count} BYTES elements"
            )
        return Tensor(name, datatype, values.reshape(shape))
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise TensorError(
            f"input '{name}': shape {shape} of {datatype} takes {expected} bytes, got {len(raw)}"
        )
    values = np.frombuffer(raw, dtype=dtype).reshape(shape)
    if datatype == "BOOL" and values.view(np.uint8).max(initial=0) > 1:
        raise TensorError(f"input '{name}': raw BOOL bytes must be 0 or 1")
    return Tensor(name, datatype, values)


def to_raw(tensor: Tensor) -> bytes:
    """The raw bytes of a tensor (little-endian, row-major)."""
    if tensor.datatype == "BYTES":
        parts = []
        for value in tensor.values.ravel():
            data = value if isinstance(value, bytes) else str(value).encode()
            parts += [_LENGTH.pack(len(data)), data]
        return b"".join(parts)
    array = np.ascontiguousarray(tensor.values, dtype=DTYPES[tensor.datatype])
    return array.tobytes()


def to_json(tensor: Tensor) -> list[Any]:
    """The flat JSON `data` of a tensor (BYTES as UTF-8 strings)."""
    if tensor.datatype == "BYTES":
        return [
            v.decode(errors="replace") if isinstance(v, bytes) else str(v)
            for v in tensor.values.ravel()
        ]
    return tensor.values.ravel().tolist()


def classification(tensor: Tensor, count: int) -> Tensor:
    """The classification extension: per row (first dimension) the `count` largest values as
    BYTES `"<value>:<index>"`, largest first, shape `[rows, count]` (`[count]` for a 1-D
    tensor)."""
    if count < 1:
        raise TensorError(f"output '{tensor.name}': classification count must be positive")
    if tensor.datatype == "BYTES":
        raise TensorError(f"output '{tensor.name}': BYTES output cannot be classified")
    values = tensor.values
    rows = values.reshape(1, -1) if values.ndim <= 1 else values.reshape(values.shape[0], -1)
    count = min(count, rows.shape[1])
    order = np.argsort(-rows.astype(np.float64), axis=1, kind="stable")[:, :count]
    labels = np.empty(order.shape, dtype=object)
    for r, indices in enumerate(order):
        labels[r] = [f"{_number(rows[r, i])}:{i}".encode() for i in indices]
    return Tensor(tensor.name, "BYTES", labels.reshape(-1) if values.ndim <= 1 else labels)


def _number(value: Any) -> str:
    value = value.item()
    return repr(value) if isinstance(value, float) else str(value)
