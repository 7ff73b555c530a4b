"""BurstGPT (``HPMLL/BurstGPT``, HF mirror ``lzzmm/BurstGPT``): request/response lengths and
arrival times, no text.

Columns are read by header NAME, so the v1.1 6-column layout
(``Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type``), the v2.0 8-column
layout (``Session ID`` and ``Elapsed time`` inserted at positions 2-3) and the fork's
re-ordered export all load. Failed requests (0 request AND 0 response tokens) are skipped and
counted, as are rows with an empty or non-numeric cell (never read as 0).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable

from kvtier.runners.datasets import DatasetFormatError
from kvtier.runners.datasets.common import (
    BAD_UTF8,
    Bad,
    check_limit,
    has_bad_utf8,
    parse_count,
    parse_seconds,
    resolve_file,
    sha256_file,
)
from kvtier.runners.requests import Request, Workload
from tqdm import tqdm

DATASET_ID = "lzzmm/BurstGPT"
FILE_NAMES = (
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
    """
    limit = check_limit(limit)
    file = resolve_file(path, FILE_NAMES, "BurstGPT CSV", HINT)
    wl = Workload(
        name="burstgpt",
        requests=[],
        source={"dataset_id": DATASET_ID, "file": str(file), "split": "train",
                "revision": None, "sha256": sha256_file(file)},
    )
    with open(file, encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DatasetFormatError(f"{file}: line 1: empty file, expected a CSV header")
        names = [h.strip().lstrip("\ufeff") for h in header]
        col = {name: i for i, name in enumerate(names)}
        for need in REQUIRED:
            if need not in col:
                raise DatasetFormatError(
                    f"{file}: line 1: missing column {need!r} (header: {','.join(names)})"
                )
        rows: Iterable[list[str]] = tqdm(
            reader, desc="burstgpt", unit="row", disable=not progress
        )
        for row in rows:
            if limit is not None and len(wl.requests) >= limit:
                break
            if not row or all(not c.strip() for c in row):
                continue
            req = _row_to_request(row, col, reader.line_num, model, log_type)
            if isinstance(req, Bad):
                wl.skip(req.reason)
            else:
                wl.requests.append(req)
    return wl


def _row_to_request(
    row: list[str], col: dict[str, int], line: int, model: str | None, log_type: str | None
) -> Request | Bad:
    if has_bad_utf8(row):
        return Bad(BAD_UTF8)

    def cell(name: str) -> str | None:
        i = col.get(name)
        return row[i].strip() if i is not None and i < len(row) else None

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
    meta: dict = {"line": line}
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
        request_id=f"burstgpt-{line}",
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
    return int(x) if x.is_integer() else x

