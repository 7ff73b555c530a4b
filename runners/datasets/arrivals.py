"""Arrival-process traces without text: Mooncake FAST'25 JSONL and the Azure LLM 2023 CSV.

Both become length-only requests (``prompt_len``, ``max_new_tokens``, ``arrival_s`` in
seconds from the trace start). Mooncake timestamps are milliseconds and its ``hash_ids`` are
512-token prefix-block hashes, kept in ``meta["hash_ids"]`` so the runner can map equal ids to
equal token blocks. Azure timestamps are wall-clock strings with 7 fractional digits (more
than ``strptime``'s ``%f`` takes), parsed exactly here.
"""

from __future__ import annotations

import csv
import os
from datetime import datetime, timedelta

from tqdm import tqdm

from kvtier.runners.datasets import DatasetFormatError
from kvtier.runners.datasets.common import (
    BAD_UTF8,
    MISSING_FIELD,
    NOT_AN_OBJECT,
    WRONG_TYPE,
    Bad,
    check_limit,
    file_revision,
    has_bad_utf8,
    iter_jsonl,
    parse_count,
    resolve_file,
    row_shape,
    sha256_file,
)
from kvtier.runners.requests import Request, Workload

#: Mooncake's prefix-block size in tokens (``len(hash_ids) == ceil(input_length / 512)``)
MOONCAKE_BLOCK_TOKENS = 512
MOONCAKE_FILES = ("synthetic_trace.jsonl", "conversation_trace.jsonl", "toolagent_trace.jsonl",
                  "*.jsonl")
MOONCAKE_HINT = ("download FAST25-release/traces/*.jsonl from GitHub kvcache-ai/Mooncake "
                 "and pass its path")
AZURE_FILES = ("AzureLLMInferenceTrace_code.csv", "AzureLLMInferenceTrace_conv.csv", "*.csv")
AZURE_HINT = ("download data/AzureLLMInferenceTrace_{code,conv}.csv from GitHub "
              "Azure/AzurePublicDataset and pass its path")

SKIP_BAD_TIMESTAMP = "bad_timestamp"
SKIP_ZERO_INPUT = "zero_input_tokens"
SKIP_ZERO_OUTPUT = "zero_output_tokens"
SKIP_HASH_IDS = "bad_hash_ids"

_EPOCH = datetime(1970, 1, 1)


def load_mooncake(
    path: str | os.PathLike | None = None,
    limit: int | None = None,
    *,
    progress: bool = False,
) -> Workload:
    """Read a Mooncake FAST'25 JSONL trace (``timestamp`` ms, ``input_length``,
    ``output_length``, ``hash_ids``)."""
    limit = check_limit(limit)
    file = resolve_file(path, MOONCAKE_FILES, "Mooncake trace", MOONCAKE_HINT)
    wl = Workload(
        name="mooncake",
        requests=[],
        source={"dataset_id": "kvcache-ai/Mooncake FAST25-release/traces", "file": str(file),
                "split": None, "revision": file_revision(file), "sha256": sha256_file(file)},
    )
    rows = tqdm(iter_jsonl(file), desc="mooncake", unit="row", disable=not progress)
    for lineno, row in rows:
        if limit is not None and len(wl.requests) >= limit:
            break
        req = row if isinstance(row, Bad) else _mooncake_row(row, lineno)
        if isinstance(req, Bad):
            wl.skip(req.reason)
        else:
            wl.requests.append(req)
    return wl


def _mooncake_row(row: object, lineno: int) -> Request | Bad:
    if not isinstance(row, dict):
        return Bad(NOT_AN_OBJECT)
    if any(k not in row for k in ("timestamp", "input_length", "output_length", "hash_ids")):
        return Bad(MISSING_FIELD)
    ts = row["timestamp"]
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        return Bad(SKIP_BAD_TIMESTAMP)
    if ts != ts or ts < 0 or ts == float("inf"):
        return Bad(SKIP_BAD_TIMESTAMP)
    counts = []
    for key in ("input_length", "output_length"):
        v = row[key]
        if isinstance(v, str):  # a count written as a string is a wrong type here, not data
            return Bad(WRONG_TYPE)
        n = parse_count(v)
        if isinstance(n, Bad):
            return n
        counts.append(n)
    n_in, n_out = counts
    if n_in == 0:
        return Bad(SKIP_ZERO_INPUT)
    if n_out == 0:
        return Bad(SKIP_ZERO_OUTPUT)
    hash_ids = row["hash_ids"]
    if not isinstance(hash_ids, list) or not all(
        isinstance(h, int) and not isinstance(h, bool) for h in hash_ids
    ):
        return Bad(SKIP_HASH_IDS)
    if len(hash_ids) != -(-n_in // MOONCAKE_BLOCK_TOKENS):
        return Bad(SKIP_HASH_IDS)
    return Request(
        request_id=f"mooncake-{lineno}",
        prompt_len=n_in,
        max_new_tokens=n_out,
        arrival_s=ts / 1000.0,
        meta={"line": lineno, "hash_ids": hash_ids, "hash_block_tokens": MOONCAKE_BLOCK_TOKENS},
    )


def parse_azure_timestamp(text: str) -> int | None:
    """``YYYY-MM-DD HH:MM:SS[.fffffff]`` -> integer nanoseconds since 1970-01-01 (naive).

    Integer nanoseconds keep all 7 fractional digits exactly (a float of epoch seconds
    would not); digits beyond the 9th are truncated. ``None`` if unparsable.
    """
    text = text.strip()
    whole, dot, frac = text.partition(".")
    if dot and not (frac.isascii() and frac.isdigit()):
        return None
    if len(whole) != 19 or whole[10] not in " T":
        return None
    try:
        dt = datetime.fromisoformat(whole)
    except ValueError:
        return None
    seconds = (dt - _EPOCH) // timedelta(seconds=1)
    return seconds * 1_000_000_000 + (int(frac[:9].ljust(9, "0")) if frac else 0)


def load_azure(
    path: str | os.PathLike | None = None,
    limit: int | None = None,
    *,
    progress: bool = False,
) -> Workload:
    """Read an Azure LLM inference trace CSV (``TIMESTAMP,ContextTokens,GeneratedTokens``).

    ``arrival_s`` counts from the earliest kept row's timestamp.
    """
    limit = check_limit(limit)
    file = resolve_file(path, AZURE_FILES, "Azure LLM inference CSV", AZURE_HINT)
    wl = Workload(
        name="azure",
        requests=[],
        source={"dataset_id": "Azure/AzurePublicDataset", "file": str(file), "split": None,
                "revision": file_revision(file), "sha256": sha256_file(file)},
    )
    stamps: list[int] = []
    with open(file, encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DatasetFormatError(f"{file}: line 1: empty file, expected a CSV header")
        if has_bad_utf8(header):
            raise DatasetFormatError(f"{file}: line 1: not UTF-8 text, expected the CSV header "
                                     "TIMESTAMP,ContextTokens,GeneratedTokens")
        col = {h.strip().lstrip("\ufeff"): i for i, h in enumerate(header)}
        for need in ("TIMESTAMP", "ContextTokens", "GeneratedTokens"):
            if need not in col:
                raise DatasetFormatError(f"{file}: line 1: missing column {need!r} "
                                         f"(header: {','.join(col)})")
        rows = tqdm(reader, desc="azure", unit="row", disable=not progress)
        for row in rows:
            if limit is not None and len(wl.requests) >= limit:
                break
            if not row or all(not c.strip() for c in row):
                continue
            if has_bad_utf8(row):
                wl.skip(BAD_UTF8)
                continue
            bad = row_shape(row, len(header))
            if bad is not None:  # short or long: reading by position would shift cells
                wl.skip(bad.reason)
                continue
            cells = [row[col[k]].strip() for k in ("TIMESTAMP", "ContextTokens", "GeneratedTokens")]
            if any(c == "" for c in cells):
                wl.skip(MISSING_FIELD)
                continue
            ts = parse_azure_timestamp(cells[0])
            if ts is None:
                wl.skip(SKIP_BAD_TIMESTAMP)
                continue
            n_in, n_out = parse_count(cells[1]), parse_count(cells[2])
            bad = n_in if isinstance(n_in, Bad) else n_out if isinstance(n_out, Bad) else None
            if bad is not None:
                wl.skip(bad.reason)
                continue
            if n_in == 0:
                wl.skip(SKIP_ZERO_INPUT)
                continue
            if n_out == 0:
                wl.skip(SKIP_ZERO_OUTPUT)
                continue
            stamps.append(ts)
            wl.requests.append(Request(
                request_id=f"azure-{reader.line_num}",
                prompt_len=n_in,
                max_new_tokens=n_out,
                meta={"line": reader.line_num, "timestamp": cells[0]},
            ))
    if stamps:
        t0 = min(stamps)
        for req, ts in zip(wl.requests, stamps, strict=True):
            req.arrival_s = (ts - t0) / 1e9
        wl.source["t0"] = (_EPOCH + timedelta(microseconds=t0 // 1000)).isoformat(sep=" ")
    return wl
