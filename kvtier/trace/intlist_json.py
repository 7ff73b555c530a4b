"""Vectorised JSON encoding of many int lists at once (the tracer's hot path).

A record's ``selected_token_pos`` holds thousands of ints; encoding them one by one in Python
(or even through ``list.tolist()`` + msgspec) dominates the tracer's cost. Here every int of a
whole decode step is written by one numpy gather from a lookup table of fixed-width decimal
strings: each element takes ``width`` bytes, right-aligned and space-padded (``[  7, 42,512]``),
which is valid JSON that every parser reads as the same list. The per-row texts are returned
as spans of one shared buffer so the caller can splice them into records with ``msgspec.Raw``
without another copy.
"""

from __future__ import annotations

import numpy as np

_COMMA = ord(",")
_SPACE = ord(" ")
_CLOSE = ord("]")

#: largest int the table path handles (tables stay <= 10**6 entries); larger rows fall back
#: to msgspec (positions beyond a million tokens are far past DeepSeek-V3.2's 160K context)
MAX_VALUE = 999_999

_tables: dict[int, list[tuple[int, np.ndarray]]] = {}


def _ndigits(value: int) -> int:
    return len(str(int(value)))


def _pieces(width: int, size: int) -> list[tuple[int, np.ndarray]]:
    """Lookup tables for the ``width - 1`` digit bytes of each value (right-aligned,
    space-padded), split into 4/2/1-byte pieces: [(byte offset, uint table)]."""
    cached = _tables.get(width)
    if cached is not None and len(cached[0][1]) >= size:
        return cached
    size = min(1 << max(size - 1, 4095).bit_length(), 10 ** (width - 1))
    ndig = width - 1
    chars = np.full((size, ndig), _SPACE, dtype=np.uint8)
    rest = np.arange(size, dtype=np.int64)
    for col in range(ndig - 1, -1, -1):
        show = (rest > 0) | (col == ndig - 1)
        chars[show, col] = (rest[show] % 10).astype(np.uint8) + ord("0")
        rest //= 10
    pieces = []
    off = 0
    for nbytes, dtype in ((4, "<u4"), (2, "<u2"), (1, "u1")):
        while ndig - off >= nbytes:
            pieces.append((off, np.ascontiguousarray(chars[:, off:off + nbytes]).view(dtype).ravel()))
            off += nbytes
    _tables[width] = pieces
    return pieces


def encode_int_rows(values: np.ndarray, row_starts: np.ndarray | None = None,
                    scratch: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Encode rows of non-negative ints as JSON arrays *without their opening bracket*.

    ``values`` is either a 2-D array (every row the same length) or a flat array split into
    rows by ``row_starts`` (length rows + 1, ascending). Rows must be non-empty. Returns
    ``(buffer, lo, hi)``: ``b"[" + buffer[lo[i]:hi[i]]`` is row i's JSON text (the caller
    writes the ``[`` as part of its template, so the rows can sit back to back). A large
    enough uint8 ``scratch`` array is reused for the buffer (pass the previous result's
    ``.base`` to avoid fresh allocations on every call).
    """
    values = np.asarray(values)
    if values.ndim == 2:
        n_rows, k = values.shape
        if n_rows and k == 0:
            raise ValueError("cannot encode an empty row")
        ends = np.arange(1, n_rows + 1, dtype=np.int64) * k
        flat = values.reshape(-1)
    else:
        if row_starts is None:
            raise ValueError("row_starts is required for flat values")
        starts = np.asarray(row_starts, dtype=np.int64)
        n_rows = len(starts) - 1
        if n_rows and (np.diff(starts) <= 0).any():
            raise ValueError("cannot encode an empty row")
        ends = starts[1:] - starts[0]
        flat = values[starts[0]: starts[-1]]
    if n_rows == 0:
        return np.zeros(0, np.uint8), np.zeros(0, np.int64), np.zeros(0, np.int64)
    vmax = int(flat.max())
    vmin = int(flat.min())
    if vmin < 0:
        raise ValueError(f"values must be >= 0, got {vmin}")
    if vmax > MAX_VALUE:
        return _encode_fallback(values, row_starts)
    width = _ndigits(vmax) + 1
    pieces = _pieces(width, vmax + 1)
    # Every element takes ``width`` bytes: right-aligned digits, then a comma; the last comma
    # of each row becomes ']'. Rows are back to back (the '[' is the caller's).
    n = len(flat)
    need = n * width + 8
    if scratch is not None and scratch.dtype == np.uint8 and scratch.ndim == 1 and len(scratch) >= need:
        buf = scratch[:need]
    else:
        buf = np.empty(max(need, int(need * 1.25)), dtype=np.uint8)[:need]
    idx = flat.astype(np.intp, copy=False)  # intp indices gather fastest
    for off, table in pieces:
        dst = np.ndarray((n,), dtype=table.dtype, buffer=buf, offset=off, strides=(width,))
        dst[...] = table[idx]
    np.ndarray((n,), dtype=np.uint8, buffer=buf, offset=width - 1, strides=(width,))[...] = _COMMA
    hi = ends * width
    lo = np.empty(n_rows, dtype=np.int64)
    lo[0] = 0
    lo[1:] = hi[:-1]
    buf[hi - 1] = _CLOSE
    return buf, lo, hi


def encode_elements(values: np.ndarray, width: int, scratch: np.ndarray | None = None
                    ) -> np.ndarray:
    """Every element of a flat array of non-negative ints as ``width`` bytes (``width - 1``
    right-aligned digits, space-padded, then a comma) back to back, with 8 bytes of slack:
    the JSON text of any span ``values[a:b]`` is ``buf[a * width : b * width - 1]`` (the
    elements without the last comma; empty for a == b). ``width`` must exceed the digits of
    ``values.max()`` and be at most ``MAX_VALUE``'s + 1."""
    flat = np.asarray(values).reshape(-1)
    n = len(flat)
    need = n * width + 8
    if scratch is not None and scratch.dtype == np.uint8 and scratch.ndim == 1 and len(scratch) >= need:
        buf = scratch[:need]
    else:
        buf = np.empty(max(need, int(need * 1.25)), dtype=np.uint8)[:need]
    if n == 0:
        return buf
    if int(flat.min()) < 0 or _ndigits(int(flat.max())) >= width:
        raise ValueError(f"values must lie in [0, 10**{width - 1}), got [{flat.min()}, {flat.max()}]")
    idx = flat.astype(np.intp, copy=False)
    for off, table in _pieces(width, int(flat.max()) + 1):
        dst = np.ndarray((n,), dtype=table.dtype, buffer=buf, offset=off, strides=(width,))
        dst[...] = table[idx]
    np.ndarray((n,), dtype=np.uint8, buffer=buf, offset=width - 1, strides=(width,))[...] = _COMMA
    return buf


def _encode_fallback(values: np.ndarray, row_starts: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compact msgspec encoding, row by row (only for values beyond ``MAX_VALUE``)."""
    import msgspec

    rows = values.tolist() if values.ndim == 2 else [
        values[a:b].tolist() for a, b in zip(row_starts[:-1], row_starts[1:], strict=True)]
    texts = [msgspec.json.encode(r)[1:] for r in rows]
    hi = np.cumsum([len(t) for t in texts])
    lo = hi - [len(t) for t in texts]
    return np.frombuffer(b"".join(texts), dtype=np.uint8), lo, hi
