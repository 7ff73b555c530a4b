"""BurstGPT (``HPMLL/BurstGPT``, HF mirror ``lzzmm/BurstGPT``): request/response lengths and
arrival times, no text.

Columns are read by header NAME, so the v1.1 6-column layout
(``Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type``), the v2.0 8-column
layout (``Session ID`` and ``Elapsed time`` inserted at positions 2-3) and the fork's
re-ordered export all load. Failed requests (0 request AND 0 response tokens) are skipped and
counted, as are rows with an empty or non-numeric cell (never read as 0) and rows with
fewer or more cells than the header (never read shifted into another column).
"""

from __future__ import annotations

import csv
import math
import os
from collections import Counter
from collections.abc import Iterable

import numpy as np
from tqdm import tqdm

from kvtier.runners.datasets import DatasetFormatError
from kvtier.runners.datasets.common import (
    BAD_UTF8,
    MISSING_FIELD,
    Bad,
    check_limit,
    file_revision,
    gc_paused,
    has_bad_utf8,
    parse_count,
    parse_seconds,
    resolve_file,
    row_shape,
    sha256_file,
)
from kvtier.runners.requests import Request, Workload

DATASET_ID = "lzzmm/BurstGPT"
FILE_NAMES = (
    "lzzmm__BurstGPT/burstgpt_train.csv",
    "BurstGPT_1.csv",
    "BurstGPT_without_fails_1.csv",
    "BurstGPT_2.csv",
    "BurstGPT_without_fails_2.csv",
    "burstgpt.csv",
    "*.csv",
)
HINT = "run scripts/datasets/download_burstgpt.sh or pass --burstgpt-csv FILE"

COL_TIMESTAMP = "Timestamp"
COL_REQUEST = "Request tokens"
COL_RESPONSE = "Response tokens"
REQUIRED = (COL_TIMESTAMP, COL_REQUEST, COL_RESPONSE)
#: optional columns copied into ``Request.meta`` under snake_case keys
OPTIONAL = {
    "Model": "model",
    "Log Type": "log_type",
    "Total tokens": "total_tokens",
    "Session ID": "session_id",
    "Elapsed time": "elapsed_s",
}

#: up to this ``limit`` the row-by-row reader (which stops early) beats reading every column
ROW_PATH_MAX_LIMIT = 10_000

SKIP_FAILED = "failed_request"  # 0 request and 0 response tokens
SKIP_ZERO_REQUEST = "zero_request_tokens"  # nothing to prefill
SKIP_ZERO_RESPONSE = "zero_response_tokens"  # nothing to decode
SKIP_FILTERED_MODEL = "filtered_model"
SKIP_FILTERED_LOG_TYPE = "filtered_log_type"


def load_burstgpt(
    path: str | os.PathLike | None = None,
    limit: int | None = None,
    *,
    model: str | None = None,
    log_type: str | None = None,
    progress: bool = False,
) -> Workload:
    """Read a BurstGPT CSV (file, or a directory holding one) into length-only requests.

    ``Request(prompt_len=Request tokens, max_new_tokens=Response tokens,
    arrival_s=Timestamp)``; ``model`` / ``log_type`` keep only rows whose ``Model`` /
    ``Log Type`` equals the value (e.g. ``model="GPT-4"`` as vLLM's sampler does).
    Request ids are ``burstgpt-<data row>`` (0-based, blank lines not counted).

    A clean file (every cell parses) is read column-wise with pyarrow and checked with
    numpy (a full 1.4 M-row file in seconds); a small ``limit``, or any file pyarrow rejects
    (a non-numeric cell, bad UTF-8, a short or long row), is read row by row with the same
    skip reasons and ids. A row with fewer cells than the header is ``missing_field``, one
    with more is ``extra_cells``: no cell is ever read from another column's position.
    """
    limit = check_limit(limit)
    file = resolve_file(path, FILE_NAMES, "BurstGPT CSV", HINT)
    wl = Workload(
        name="burstgpt",
        requests=[],
        source={"dataset_id": DATASET_ID, "file": str(file), "split": "train",
                "revision": file_revision(file), "sha256": sha256_file(file)},
    )
    names = _header(file)
    fast = None
    if limit is None or limit > ROW_PATH_MAX_LIMIT:  # a small limit reads only a few rows
        fast = _load_columnar(file, names, limit, model, log_type)
    if fast is not None:
        wl.requests, wl.skipped = fast
        return wl
    col = {name: i for i, name in enumerate(names)}
    with open(file, encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f)
        next(reader, None)
        rows: Iterable[list[str]] = tqdm(
            reader, desc="burstgpt", unit="row", disable=not progress
        )
        k = 0
        for row in rows:
            if limit is not None and len(wl.requests) >= limit:
                break
            if not row:
                continue
            req = row_shape(row, len(names)) or _row_to_request(row, col, k, model, log_type)
            k += 1
            if isinstance(req, Bad):
                wl.skip(req.reason)
            else:
                wl.requests.append(req)
    return wl


def _header(file) -> list[str]:
    """Column names (BOM and spaces stripped); every required column must be there."""
    with open(file, encoding="utf-8", errors="surrogateescape", newline="") as f:
        header = next(csv.reader(f), None)
    if header is None:
        raise DatasetFormatError(f"{file}: line 1: empty file, expected a CSV header")
    if has_bad_utf8(header):
        raise DatasetFormatError(f"{file}: line 1: not UTF-8 text, expected a CSV header "
                                 f"({','.join(REQUIRED)}, ...)")
    names = [h.strip().lstrip("\ufeff") for h in header]
    for need in REQUIRED:
        if need not in names:
            raise DatasetFormatError(
                f"{file}: line 1: missing column {need!r} (header: {','.join(names)})"
            )
    return names


def _load_columnar(file, names: list[str], limit: int | None, model: str | None,
                   log_type: str | None) -> tuple[list[Request], Counter] | None:
    """The whole file at once with pyarrow + numpy; ``None`` if pyarrow rejects any cell."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from pyarrow import csv as pacsv

    numeric = (COL_TIMESTAMP, COL_REQUEST, COL_RESPONSE, "Total tokens", "Elapsed time")
    types = {n: (pa.float64() if n in numeric else pa.string()) for n in names}
    try:
        table = pacsv.read_csv(
            file,
            read_options=pacsv.ReadOptions(column_names=names, skip_rows=1),
            convert_options=pacsv.ConvertOptions(column_types=types, null_values=[""],
                                                 strings_can_be_null=False,
                                                 quoted_strings_can_be_null=False),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeDecodeError):
        return None
    n = table.num_rows

    def floats(name: str) -> tuple[np.ndarray, np.ndarray]:
        column = table.column(name)
        return (column.to_numpy(zero_copy_only=False).astype(np.float64),
                column.is_null().to_numpy(zero_copy_only=False))

    ts, ts_null = floats(COL_TIMESTAMP)
    reasons: list[str] = []  # code k + 1 in ``code`` is reasons[k]; 0 = kept
    code = np.zeros(n, dtype=np.int16)

    def flag(mask: np.ndarray, why: str) -> None:
        if why not in reasons:
            reasons.append(why)
        code[mask & (code == 0)] = reasons.index(why) + 1

    flag(ts_null, MISSING_FIELD)
    flag(~np.isfinite(np.where(ts_null, 0.0, ts)) | (ts < 0), "bad_timestamp")
    counts = []
    for name in (COL_REQUEST, COL_RESPONSE):
        x, null = floats(name)
        flag(null, MISSING_FIELD)
        x = np.where(null, 0.0, x)
        finite = np.isfinite(x)
        flag(~finite | (x != np.floor(np.where(finite, x, 0.0))), "non_numeric")
        flag(x < 0, "negative_tokens")
        counts.append(x)
    req_toks, resp_toks = counts
    flag((req_toks == 0) & (resp_toks == 0), SKIP_FAILED)
    flag(req_toks == 0, SKIP_ZERO_REQUEST)
    flag(resp_toks == 0, SKIP_ZERO_RESPONSE)
    for wanted, name, why in ((model, "Model", SKIP_FILTERED_MODEL),
                              (log_type, "Log Type", SKIP_FILTERED_LOG_TYPE)):
        if wanted is not None:
            same = (pc.equal(table.column(name), wanted).to_numpy(zero_copy_only=False)
                    if name in names else np.zeros(n, dtype=bool))
            flag(~same, why)
    kept = np.flatnonzero(code == 0)
    stop = n  # the row-by-row path stops reading once ``limit`` rows are kept
    if limit is not None and len(kept) >= limit:
        kept = kept[:limit]
        stop = int(kept[-1]) + 1 if limit else 0
    tally = np.bincount(code[:stop], minlength=len(reasons) + 1)
    skipped = Counter({why: int(tally[k + 1]) for k, why in enumerate(reasons)
                       if tally[k + 1]})
    with gc_paused():
        take = pa.array(kept)
        keys, columns = ["row"], [kept.tolist()]
        for name, key in OPTIONAL.items():
            if name in names:
                values = table.column(name).take(take).to_pylist()
                if key in ("total_tokens", "elapsed_s"):
                    values = [None if v is None or not math.isfinite(v) else
                              int(v) if v.is_integer() else v for v in values]
                else:
                    values = [v or None for v in values]
                keys.append(key)
                columns.append(values)
        metas = [dict(zip(keys, vals, strict=True)) for vals in zip(*columns, strict=True)]
        requests = [
            Request(f"burstgpt-{i}", None, None, p, r, t, None, m)
            for i, p, r, t, m in zip(columns[0], req_toks[kept].astype(np.int64).tolist(),
                                     resp_toks[kept].astype(np.int64).tolist(), ts[kept].tolist(),
                                     metas, strict=True)
        ]
    return requests, skipped


def _row_to_request(
    row: list[str], col: dict[str, int], k: int, model: str | None, log_type: str | None
) -> Request | Bad:
    if has_bad_utf8(row):
        return Bad(BAD_UTF8)

    def cell(name: str) -> str | None:  # the row has one cell per header column
        i = col.get(name)
        return row[i].strip() if i is not None else None

    ts = parse_seconds(cell(COL_TIMESTAMP))
    if isinstance(ts, Bad):
        return ts
    req_toks = parse_count(cell(COL_REQUEST))
    if isinstance(req_toks, Bad):
        return req_toks
    resp_toks = parse_count(cell(COL_RESPONSE))
    if isinstance(resp_toks, Bad):
        return resp_toks
    if req_toks == 0 and resp_toks == 0:
        return Bad(SKIP_FAILED)
    if req_toks == 0:
        return Bad(SKIP_ZERO_REQUEST)
    if resp_toks == 0:
        return Bad(SKIP_ZERO_RESPONSE)
    meta: dict = {"row": k}
    for name, key in OPTIONAL.items():
        value = cell(name)
        if value is None:
            continue
        if key in ("total_tokens", "elapsed_s"):
            meta[key] = _number_or_none(value)
        else:
            meta[key] = value or None
    if model is not None and meta.get("model") != model:
        return Bad(SKIP_FILTERED_MODEL)
    if log_type is not None and meta.get("log_type") != log_type:
        return Bad(SKIP_FILTERED_LOG_TYPE)
    return Request(
        request_id=f"burstgpt-{k}",
        prompt_len=req_toks,
        max_new_tokens=resp_toks,
        arrival_s=ts,
        meta=meta,
    )


def _number_or_none(value: str) -> float | int | None:
    try:
        x = float(value)
    except ValueError:
        return None
    if not np.isfinite(x):
        return None
    return int(x) if x.is_integer() else x

