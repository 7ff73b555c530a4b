"""Arrow columns of a trace as numpy arrays, zero-copy where possible and without pandas.

pyarrow's ``to_numpy`` and ``np.asarray(array)`` import pandas on first use (about 0.4 s), a
large part of a short command's run time, so kvtier reads the buffers itself: fixed-width
columns become views of their data buffer, list columns (offsets, values) pairs.
"""

from __future__ import annotations

import numpy as np

_DTYPES = {"int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
           "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
           "float": np.float32, "double": np.float64}


def one_array(col):
    """A ChunkedArray as one Array (an Array is returned as is; one chunk without a copy)."""
    if not hasattr(col, "combine_chunks"):
        return col
    return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()


def validity(arr) -> np.ndarray | None:
    """The validity mask of an Array (None when it has no nulls)."""
    if not arr.null_count:
        return None
    bits = np.frombuffer(arr.buffers()[0], np.uint8)
    return np.unpackbits(bits, bitorder="little")[arr.offset:arr.offset + len(arr)].astype(bool)


def as_numpy(col) -> np.ndarray:
    """A fixed-width (int, float or bool) Arrow column as numpy: a read-only view of its data
    for ints and floats; nulls become NaN in float columns (an int or bool column with nulls
    raises ValueError)."""
    arr = one_array(col)
    name = str(arr.type)
    n = len(arr)
    if name == "bool":
        if arr.null_count:
            raise ValueError("bool column with nulls")
        bits = np.frombuffer(arr.buffers()[1], np.uint8)
        return np.unpackbits(bits, bitorder="little")[arr.offset:arr.offset + n].astype(bool)
    dtype = _DTYPES.get(name)
    if dtype is None:
        raise TypeError(f"not a fixed-width numeric column: {arr.type}")
    buf = arr.buffers()[1]
    out = (np.frombuffer(buf, dtype, count=n, offset=arr.offset * np.dtype(dtype).itemsize)
           if buf is not None else np.zeros(0, dtype))
    valid = validity(arr)
    if valid is not None:
        if out.dtype.kind != "f":
            raise ValueError(f"{arr.type} column with nulls")
        out = np.where(valid, out, np.nan)
    return out


def list_parts(col) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (offsets [n + 1] from 0, int64, flat values): row i is
    ``values[offsets[i]:offsets[i + 1]]`` (a null list reads as empty)."""
    arr = one_array(col)
    offs = as_numpy(arr.offsets).astype(np.int64)
    if not len(offs):
        return np.zeros(1, np.int64), as_numpy(arr.values)[:0]
    vals = as_numpy(arr.values)[offs[0]:offs[-1]]
    return offs - offs[0], vals
