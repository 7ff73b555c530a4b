"""BurstGPT loader: both column layouts by name, failed and malformed rows skipped and counted."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.runners.datasets import DatasetFormatError, DatasetNotFound, burstgpt, load_burstgpt

SAMPLE = Path(__file__).parents[2] / "shared" / "data" / "burstgpt" / "BurstGPT_1.head400.csv"

V11 = (
    "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
    "5,ChatGPT,472,18,490,Conversation log\n"
    "45,ChatGPT,0,0,0,Conversation log\n"  # failed
    "46,GPT-4,,12,12,API log\n"  # empty cell: missing, not 0
    "47,GPT-4,abc,12,12,API log\n"  # non-numeric
    "48,GPT-4,-3,12,9,API log\n"  # negative
    "oops,GPT-4,3,12,15,API log\n"  # bad timestamp
    "49,GPT-4,7\n"  # short row
    "118,GPT-4,417,276,693,Conversation log\n"
)
V20 = (
    "Timestamp,Session ID,Elapsed time,Model,Request tokens,Response tokens,Total tokens,"
    "Log Type\n"
    "19440110.0,abc123,2.5,GPT-4,100,20,120,Conversation log\n"
    "19440111.5,,1.0,ChatGPT,30,0,30,API log\n"  # zero response: nothing to decode
    "19440112.0,,1.0,ChatGPT,0,0,0,API log\n"  # failed
)


def write(tmp_path: Path, text: str | bytes, name: str = "b.csv") -> Path:
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def test_v11_layout_rows_and_skips(tmp_path):
    wl = load_burstgpt(write(tmp_path, V11))
    assert [(r.prompt_len, r.max_new_tokens, r.arrival_s) for r in wl.requests] == [
        (472, 18, 5.0), (417, 276, 118.0)]
    assert wl.requests[1].meta["model"] == "GPT-4"
    assert wl.requests[1].meta["log_type"] == "Conversation log"
    assert dict(wl.skipped) == {"failed_request": 1, "missing_field": 2, "non_numeric": 1,
                                "negative_tokens": 1, "bad_timestamp": 1}
    assert len({r.request_id for r in wl.requests}) == 2
    assert wl.source["dataset_id"] == "lzzmm/BurstGPT" and len(wl.source["sha256"]) == 64
    assert wl.source["revision"] is None  # a local file with no download record


def test_v20_layout_read_by_name(tmp_path):
    wl = load_burstgpt(write(tmp_path, V20))
    (r,) = wl.requests
    assert (r.prompt_len, r.max_new_tokens, r.arrival_s) == (100, 20, 19440110.0)
    assert r.meta["session_id"] == "abc123" and r.meta["elapsed_s"] == 2.5
    assert dict(wl.skipped) == {"zero_response_tokens": 1, "failed_request": 1}


def test_reordered_export_crlf_no_final_newline(tmp_path):
    text = ("Log Type,Timestamp,Request tokens,Response tokens,Total tokens,Model\r\n"
            "API log,3,10,5,15,GPT-4\r\nAPI log,4,11,6,17,ChatGPT")
    wl = load_burstgpt(write(tmp_path, text))
    assert [(r.arrival_s, r.prompt_len, r.max_new_tokens) for r in wl.requests] == [
        (3.0, 10, 5), (4.0, 11, 6)]


def test_filters_and_limit(tmp_path):
    p = write(tmp_path, V11)
    assert [r.prompt_len for r in load_burstgpt(p, model="GPT-4").requests] == [417]
    wl = load_burstgpt(p, limit=1)
    assert len(wl.requests) == 1 and not wl.skipped  # stops reading at the limit
    assert load_burstgpt(p, limit=0).requests == []
    with pytest.raises(ValueError, match="limit"):
        load_burstgpt(p, limit=-1)


def test_bad_utf8_row_skipped(tmp_path):
    data = V11.encode().replace(b"490,Conversation log", b"490,Conv\xff log")
    wl = load_burstgpt(write(tmp_path, data))
    assert wl.skipped["bad_utf8"] == 1 and [r.prompt_len for r in wl.requests] == [417]


def test_missing_column_and_missing_file(tmp_path):
    p = write(tmp_path, "Timestamp,Model,Response tokens\n1,GPT-4,3\n")
    with pytest.raises(DatasetFormatError, match="Request tokens"):
        load_burstgpt(p)
    with pytest.raises(DatasetNotFound, match="--burstgpt-csv"):
        load_burstgpt(tmp_path / "nope.csv")
    with pytest.raises(DatasetNotFound, match="download_burstgpt.sh"):
        load_burstgpt(tmp_path / "empty_dir_missing")


def test_binary_file_is_one_clear_error(tmp_path):
    """A binary file used to report its undecodable header bytes as the missing header."""
    p = write(tmp_path, b"\x8f9\xc0\xa38\xd3T\xdf,\xd9\n\x00\x01,\x02\n")
    with pytest.raises(DatasetFormatError, match="line 1: not UTF-8 text, expected a CSV header"):
        load_burstgpt(p)
    from kvtier.runners.datasets import load_azure

    with pytest.raises(DatasetFormatError, match="line 1: not UTF-8 text"):
        load_azure(p)


def test_directory_lookup(tmp_path):
    write(tmp_path, V11, "BurstGPT_1.csv")
    assert len(load_burstgpt(tmp_path).requests) == 2


@pytest.mark.skipif(not SAMPLE.is_file(), reason="shared/data BurstGPT sample absent")
@pytest.mark.parametrize("limit", [None, 50])  # the columnar fallback and the row path
def test_short_and_long_rows_are_never_read_shifted(tmp_path, limit):
    """Real rows of the sample with one cell dropped or one added: a short row is
    ``missing_field`` and a long one ``extra_cells``, whichever cell went missing. (Read by
    position, a row without its ``Response tokens`` cell took ``Total tokens`` as the
    response length.)"""
    lines = SAMPLE.read_text().splitlines()
    header, rows = lines[0], lines[1:21]
    assert rows[0] == "5,ChatGPT,472,18,490,Conversation log"
    cut = rows[:]
    cut[0] = "5,ChatGPT,472,490,Conversation log"  # no Response tokens cell
    cut[1] = ",".join(c for i, c in enumerate(rows[1].split(",")) if i != 0)  # no Timestamp
    cut[2] = rows[2] + ",extra"  # one cell too many
    cut[3] = ",".join(rows[3].split(",")[:3])  # cut after Request tokens
    wl = load_burstgpt(write(tmp_path, "\n".join([header, *cut]) + "\n"), limit)
    assert dict(wl.skipped) == {"missing_field": 3, "extra_cells": 1}
    full = load_burstgpt(write(tmp_path, "\n".join([header, *rows]) + "\n", "ok.csv"), limit)
    assert wl.requests == [r for r in full.requests if r.meta["row"] >= 4]
    assert all(r.meta["total_tokens"] == r.prompt_len + r.max_new_tokens for r in wl.requests)


@pytest.mark.skipif(not SAMPLE.is_file(), reason="shared/data BurstGPT sample absent")
def test_real_sample_matches_csv_reference():
    wl = load_burstgpt(SAMPLE)
    with open(SAMPLE, newline="") as f:
        rows = list(csv.DictReader(f))
    kept = [r for r in rows if not (r["Request tokens"] == "0" and r["Response tokens"] == "0")]
    assert len(rows) == 400 and wl.skipped == {"failed_request": 17}
    assert [(r.prompt_len, r.max_new_tokens, r.arrival_s) for r in wl.requests] == [
        (int(r["Request tokens"]), int(r["Response tokens"]), float(r["Timestamp"]))
        for r in kept]
    assert all(r.meta["total_tokens"] == r.prompt_len + r.max_new_tokens for r in wl.requests)


CELLS = st.sampled_from(["0", "7", "12.0", "-3", "1.5", "-1.5", "", "nan", "inf", "1e3", "40"])


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(st.tuples(CELLS, CELLS, CELLS, st.sampled_from(["GPT-4", "ChatGPT", ""])),
                     max_size=25),
       limit=st.one_of(st.none(), st.integers(0, 8)),
       model=st.sampled_from([None, "GPT-4"]))
def test_columnar_path_equals_row_path(tmp_path_factory, rows, limit, model):
    """Files pyarrow accepts take the numpy path; it must agree with the row-by-row one."""
    text = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n" + "".join(
        f"{ts},{m},{a},{b},{a},API log\n" for ts, a, b, m in rows)
    p = tmp_path_factory.mktemp("b") / "b.csv"
    p.write_text(text)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(burstgpt, "ROW_PATH_MAX_LIMIT", -1)  # columnar even for a small limit
        fast = load_burstgpt(p, limit, model=model)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(burstgpt, "_load_columnar", lambda *a, **k: None)
        slow = load_burstgpt(p, limit, model=model)
    assert fast.requests == slow.requests
    assert fast.skipped == slow.skipped
