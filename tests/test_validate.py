"""Validator: names file, line and field; catches truncation, corruption, broken arithmetic."""

from __future__ import annotations

import subprocess
import sys

import msgspec
from tracegen import make_trace

from kvtier.trace.validate import validate_trace


def lines_of(path):
    return path.read_bytes().splitlines(keepends=True)


def test_sanity_trace_is_valid(tmp_path):
    make_trace(tmp_path / "t", store_scores=True)
    rep = validate_trace(tmp_path / "t")
    assert rep.ok, rep.messages
    assert rep.records == 3 * 3 * 5


def test_truncated_file(tmp_path):
    make_trace(tmp_path / "t")
    f = tmp_path / "t" / "trace_steps.jsonl"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    rep = validate_trace(tmp_path / "t")
    assert rep.errors == 1
    assert rep.records == 44
    assert rep.messages[0].startswith(f"{f}:45: $: truncated final line")


def test_wrong_type_names_line_and_field(tmp_path):
    make_trace(tmp_path / "t")
    f = tmp_path / "t" / "trace_steps.jsonl"
    lines = lines_of(f)
    rec = msgspec.json.decode(lines[6])
    rec["kv_fetch"]["hbm"]["bytes_read"] = "lots"
    lines[6] = msgspec.json.encode(rec) + b"\n"
    lines[9] = b'{"event": "dsa_topk", \n'
    f.write_bytes(b"".join(lines))
    rep = validate_trace(tmp_path / "t")
    assert rep.errors == 2
    assert rep.messages[0] == f"{f}:7: $.kv_fetch.hbm.bytes_read: Expected `int`, got `str`"
    assert rep.messages[1].startswith(f"{f}:10: $: malformed JSON")


def test_semantic_checks(tmp_path):
    make_trace(tmp_path / "t")
    f = tmp_path / "t" / "trace_steps.jsonl"
    lines = lines_of(f)
    broken = {}
    for i, (fld, mutate) in enumerate([
        ("$.selected_token_pos", lambda r: r["selected_token_pos"].reverse()),
        ("$.seq_len_current", lambda r: r.update(seq_len_current=r["seq_len_current"] + 1)),
        ("$.selected_block_ids", lambda r: r["selected_block_ids"].append(10**6)),
        ("$.unique_blocks", lambda r: r.update(unique_blocks=r["unique_blocks"] + 1)),
        ("$.offset_p50", lambda r: r.update(offset_p50=r["offset_p50"] + 0.5)),
        ("$.tokens_per_touched_block.p95", lambda r: r["tokens_per_touched_block"].update(p95=99.0)),
        ("$.prefix.intersection_ratio", lambda r: r["prefix"].update(intersection_ratio=2.0)),
        ("$.prefix.prefix_cache_hit", lambda r: r["prefix"].update(prefix_cache_hit=not r["prefix"]["prefix_cache_hit"])),
        ("$.kv_fetch.local_pool.read_ops", lambda r: r["kv_fetch"]["local_pool"].update(read_ops=-1)),
    ]):
        rec = msgspec.json.decode(lines[i * 3])
        mutate(rec)
        lines[i * 3] = msgspec.json.encode(rec) + b"\n"
        broken[i * 3 + 1] = fld
    f.write_bytes(b"".join(lines))
    rep = validate_trace(tmp_path / "t")
    found: dict[int, set[str]] = {}
    for m in rep.messages:
        found.setdefault(int(m.split(":")[1]), set()).add(m.split(": ")[1])
    assert set(found) == set(broken)
    for line, fld in broken.items():
        assert fld in found[line], (line, fld, rep.messages)


def test_missing_and_parquet_corruption(tmp_path):
    rep = validate_trace(tmp_path / "nope")
    assert not rep.ok and "no such trace directory" in rep.messages[0]
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "trace_steps.parquet").write_bytes(b"PAR1garbage")
    rep = validate_trace(tmp_path / "p")
    assert not rep.ok and "not a readable Parquet file" in " ".join(rep.messages)


def test_bad_summary_and_meta(tmp_path):
    make_trace(tmp_path / "t")
    (tmp_path / "t" / "summary.json").write_bytes(b'{"run_name": 3}')
    rep = validate_trace(tmp_path / "t")
    assert rep.errors == 1 and "summary.json: $.run_name: Expected `str`" in rep.messages[0]
    (tmp_path / "t" / "trace_meta.json").write_bytes(b"{")
    rep = validate_trace(tmp_path / "t")
    assert "trace_meta.json: malformed JSON" in rep.messages[0]


def test_validate_does_not_import_torch(tmp_path):
    make_trace(tmp_path / "t")
    code = (
        "import sys\nfrom kvtier.cli import main\n"
        f"rc = main(['validate', {str(tmp_path / 't')!r}])\n"
        "assert rc == 0, rc\nassert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
