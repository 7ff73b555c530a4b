"""Shared loader pieces: the streaming JSON-array reader against json.loads, count parsing,
file lookup, and that loaders and the serving simulator import without torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.runners.datasets import DatasetNotFound, common
from kvtier.runners.datasets.common import (
    Bad,
    iter_json_array,
    iter_jsonl,
    parse_count,
    resolve_file,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.text(max_size=12)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=5), kids,
                                                             max_size=4),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None)
@given(items=st.lists(json_values, max_size=8), indent=st.sampled_from([None, 2]),
       chunk=st.sampled_from([1, 3, 16, 1 << 20]))
def test_streaming_array_equals_json_loads(tmp_path_factory, items, indent, chunk):
    p = tmp_path_factory.mktemp("arr") / "a.json"
    p.write_text(json.dumps(items, indent=indent, ensure_ascii=False), encoding="utf-8")
    old = common._CHUNK
    common._CHUNK = chunk  # tiny chunks put element and number boundaries everywhere
    try:
        got = list(iter_json_array(p))
    finally:
        common._CHUNK = old
    assert got == list(enumerate(items))


def test_streaming_array_bad_input(tmp_path):
    p = tmp_path / "a.json"
    p.write_bytes(b'\xef\xbb\xbf [ {"a": "\xff"} , 12 ,"x"]')  # BOM, bad UTF-8 in element 0
    assert list(iter_json_array(p)) == [(0, Bad("bad_utf8")), (1, 12), (2, "x")]
    # an escaped lone surrogate cannot be encoded either; a proper pair is fine
    p.write_bytes(b'["\\ud83d", "\\ud83d\\ude00", "\\u00e9"]')
    assert list(iter_json_array(p)) == [(0, Bad("bad_utf8")), (1, "\U0001f600"), (2, "\u00e9")]
    p.write_bytes(b'"\\ud83d"\n"\\ud83d\\ude00"\n"ok \xff"\n')
    assert list(iter_jsonl(p)) == [(1, Bad("bad_utf8")), (2, "\U0001f600"), (3, Bad("bad_utf8"))]
    p.write_bytes(b'[1, 2 3]')
    assert list(iter_json_array(p)) == [(0, 1), (1, 2), (2, Bad("invalid_json"))]
    p.write_bytes(b'{"not": "an array"}')
    assert list(iter_json_array(p)) == [(0, Bad("invalid_json"))]
    p.write_bytes(b'[1, 2')
    assert list(iter_json_array(p)) == [(0, 1), (1, 2), (2, Bad("invalid_json"))]
    p.write_bytes(b'[]')
    assert list(iter_json_array(p)) == []


@pytest.mark.parametrize(("value", "expected"), [
    ("12", 12), (12, 12), ("12.0", 12), (" 7 ", 7), (0, 0),
    ("", Bad("missing_field")), (None, Bad("missing_field")), ("-1", Bad("negative_tokens")),
    ("1.5", Bad("non_numeric")), ("abc", Bad("non_numeric")), ("nan", Bad("non_numeric")),
    ("inf", Bad("non_numeric")), (True, Bad("wrong_type")), ([1], Bad("wrong_type")),
])
def test_parse_count(value, expected):
    assert parse_count(value) == expected


def test_resolve_file_and_datas_dir(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.csv").write_text("a\n")
    assert resolve_file(tmp_path, ("x.csv",), "X", "hint") == tmp_path / "sub" / "x.csv"
    with pytest.raises(DatasetNotFound, match="none of y.csv in .*; pass --y"):
        resolve_file(tmp_path, ("y.csv",), "Y", "pass --y")
    monkeypatch.setenv("DATAS_DIR", str(tmp_path))
    assert common.data_root() == tmp_path
    assert resolve_file(None, ("x.csv",), "X", "hint") == tmp_path / "sub" / "x.csv"
    # a glob only looks at the directory's own files and must match exactly one
    with pytest.raises(DatasetNotFound, match="none of"):
        resolve_file(None, ("*.csv",), "X", "hint")
    assert resolve_file(tmp_path / "sub", ("*.csv",), "X", "h") == tmp_path / "sub" / "x.csv"
    (tmp_path / "sub" / "y.csv").write_text("a\n")
    with pytest.raises(DatasetNotFound, match="several files match"):
        resolve_file(tmp_path / "sub", ("*.csv",), "X", "h")


def test_imports_stay_torch_free():
    code = ("import sys, kvtier.runners.datasets, kvtier.runners.serving_sim; "
            "bad = [m for m in ('torch', 'transformers', 'datasets', 'huggingface_hub') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
