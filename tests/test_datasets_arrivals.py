"""Mooncake FAST'25 and Azure LLM 2023 arrival traces: units, hash_ids, timestamps, bad rows."""

from __future__ import annotations

import csv
import json
import math
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import pytest

from kvtier.runners.datasets import DatasetFormatError, DatasetNotFound, load_azure, load_mooncake
from kvtier.runners.datasets.arrivals import parse_azure_timestamp

DATA = Path(__file__).parents[2] / "shared" / "data"
MOONCAKE = DATA / "mooncake" / "synthetic_trace.jsonl"
AZURE = DATA / "azure_llm" / "AzureLLMInferenceTrace_code.csv"


def mc(ts, n_in, n_out, hash_ids=None):
    if hash_ids is None:
        hash_ids = list(range(math.ceil(n_in / 512)))
    return json.dumps({"timestamp": ts, "input_length": n_in, "output_length": n_out,
                       "hash_ids": hash_ids})


def test_mooncake_rows_units_and_skips(tmp_path):
    lines = [
        mc(0, 1000, 6, [7, 8]),
        mc(1500, 512, 3, [7]),
        "{not json",
        "[1, 2]",
        json.dumps({"timestamp": 5, "input_length": 10}),  # missing fields
        mc(-1, 10, 1),  # negative timestamp
        mc("5", 10, 1),  # timestamp as a string
        mc(7, -10, 1, []),  # negative count
        mc(8, "10", 1, [0]),  # count as a string
        mc(9, 10, 0),  # nothing to decode
        mc(10, 1025, 1, [1, 2]),  # hash_ids must be ceil(1025/512) = 3 blocks
        mc(11, 10, 1, ["a"]),
        "",
        mc(2500, 513, 4, [7, 9]),
    ]
    p = tmp_path / "t.jsonl"
    p.write_bytes(("\n".join(lines)).encode() + b"\n" + b'{"timestamp": "\xff"}\n')
    wl = load_mooncake(p)
    assert [(r.arrival_s, r.prompt_len, r.max_new_tokens, r.meta["hash_ids"])
            for r in wl.requests] == [(0.0, 1000, 6, [7, 8]), (1.5, 512, 3, [7]),
                                      (2.5, 513, 4, [7, 9])]
    assert all(r.meta["hash_block_tokens"] == 512 for r in wl.requests)
    assert dict(wl.skipped) == {"invalid_json": 1, "not_an_object": 1, "missing_field": 1,
                                "bad_timestamp": 2, "negative_tokens": 1, "wrong_type": 1,
                                "zero_output_tokens": 1, "bad_hash_ids": 2, "bad_utf8": 1}
    assert len(load_mooncake(p, limit=2).requests) == 2


def test_azure_timestamp_parsing_exact():
    ns = parse_azure_timestamp("2023-11-16 18:17:03.9799600")
    base = int((datetime(2023, 11, 16, 18, 17, 3) - datetime(1970, 1, 1)).total_seconds())
    assert ns == base * 10**9 + 979_960_000
    assert parse_azure_timestamp("2023-11-16 18:17:04") == (base + 1) * 10**9
    assert parse_azure_timestamp("2023-11-16T18:17:04.5") == (base + 1) * 10**9 + 5 * 10**8
    for bad in ("", "yesterday", "2023-11-16", "2023-13-16 18:17:04.1", "2023-11-16 18:17:04.x",
                "2023-11-16 18:17:04+01:00"):
        assert parse_azure_timestamp(bad) is None, bad


def test_azure_rows_crlf_and_skips(tmp_path):
    text = ("TIMESTAMP,ContextTokens,GeneratedTokens\r\n"
            "2023-11-16 18:17:03.9799600,4808,10\r\n"
            "2023-11-16 18:17:04.0319600,3180,8\r\n"
            "not a time,10,10\r\n"
            "2023-11-16 18:17:05.0000000,,10\r\n"
            "2023-11-16 18:17:05.0000000,10,-1\r\n"
            "2023-11-16 18:17:05.0000000,10,1.5\r\n"
            "2023-11-16 18:17:05.0000000,10,0\r\n"
            "2023-11-16 18:17:02.9799601,7,1")  # earlier than the first row, no final newline
    p = tmp_path / "a.csv"
    p.write_text(text, newline="")
    wl = load_azure(p)
    got = [(round(r.arrival_s, 9), r.prompt_len, r.max_new_tokens) for r in wl.requests]
    assert got == [(0.9999999, 4808, 10), (1.0519999, 3180, 8), (0.0, 7, 1)]
    assert dict(wl.skipped) == {"bad_timestamp": 1, "missing_field": 1, "negative_tokens": 1,
                                "non_numeric": 1, "zero_output_tokens": 1}


@pytest.mark.skipif(not AZURE.is_file(), reason="shared/data Azure trace absent")
def test_azure_short_and_long_rows_are_never_read_shifted(tmp_path):
    """Real rows (CRLF, no final newline) with a cell dropped or added: never read by
    position into the wrong column."""
    lines = AZURE.read_bytes().decode().split("\r\n")
    header, rows = lines[0], lines[1:11]
    cut = rows[:]
    ts, ctx, gen = rows[0].split(",")
    cut[0] = f"{ts},{gen}"  # no ContextTokens cell
    cut[1] = rows[1] + ",12"  # one cell too many
    p = tmp_path / "a.csv"
    p.write_bytes("\r\n".join([header, *cut]).encode())
    wl = load_azure(p)
    assert dict(wl.skipped) == {"missing_field": 1, "extra_cells": 1}
    assert [(r.prompt_len, r.max_new_tokens) for r in wl.requests] == [
        (int(r.split(",")[1]), int(r.split(",")[2])) for r in rows[2:]]


def test_missing_inputs(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text("TIMESTAMP,ContextTokens\n2023-11-16 18:17:03.9,1\n")
    with pytest.raises(DatasetFormatError, match="GeneratedTokens"):
        load_azure(p)
    with pytest.raises(DatasetNotFound, match="Mooncake"):
        load_mooncake(tmp_path / "missing.jsonl")
    with pytest.raises(DatasetNotFound, match="AzurePublicDataset"):
        load_azure(tmp_path / "nothing_here")


@pytest.mark.skipif(not MOONCAKE.is_file(), reason="shared/data Mooncake trace absent")
def test_mooncake_real_trace():
    wl = load_mooncake(MOONCAKE)
    rows = [json.loads(line) for line in MOONCAKE.read_text().splitlines()]
    assert len(wl.requests) == len(rows) == 3993 and not wl.skipped
    assert [r.arrival_s for r in wl.requests] == [row["timestamp"] / 1000 for row in rows]
    assert wl.requests[-1].arrival_s == pytest.approx(1022.025)
    assert sum(len(r.meta["hash_ids"]) for r in wl.requests) == 121_877


@pytest.mark.skipif(not AZURE.is_file(), reason="shared/data Azure trace absent")
def test_azure_real_trace_against_decimal_reference():
    wl = load_azure(AZURE)
    with open(AZURE, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(wl.requests) == len(rows) == 8819 and not wl.skipped

    def ref(s: str) -> Decimal:  # exact reference: Decimal seconds
        whole, _, frac = s.partition(".")
        dt = datetime.strptime(whole, "%Y-%m-%d %H:%M:%S")
        return Decimal(int((dt - datetime(1970, 1, 1)).total_seconds())) + Decimal("0." + frac)

    t0 = min(ref(r["TIMESTAMP"]) for r in rows)
    for req, row in zip(wl.requests, rows, strict=True):
        assert req.arrival_s == pytest.approx(float(ref(row["TIMESTAMP"]) - t0), abs=1e-9)
        assert (req.prompt_len, req.max_new_tokens) == (int(row["ContextTokens"]),
                                                        int(row["GeneratedTokens"]))
    assert wl.requests[1].arrival_s == pytest.approx(0.052, abs=1e-12)
