"""RULER loader: a tiny tarball in the allenai/ruler_data layout, built here."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from kvtier.runners.datasets import DatasetNotFound, load_ruler
from kvtier.runners.datasets.ruler import task_and_length


def row(i: int, **extra) -> str:
    r = {"index": 13865, "input": f"haystack {i} question?", "outputs": [f"v{i}"],
         "length": 4000 + i, "length_w_model_temp": 4010 + i, "answer_prefix": " Answer:"}
    r.update(extra)
    return json.dumps(r)


FILES = {
    "data/ruler/niah_single_1/validation_4096.jsonl":
        "\n".join([row(0), row(1, answer_prefix=None), "{broken"]) + "\n",
    "data/ruler/niah_single_1/validation_8192.jsonl": row(2) + "\n",
    "data/ruler/meta/config.json": json.dumps({"tasks": ["qa_1"], "seed": 42}, indent=2),
    "data/ruler/vt/validation_4096.json": json.dumps(
        {"input": "pretty row", "outputs": ["x"]}, indent=2),
    "data/ruler/qa_1/validation_4096.jsonl":
        "\n".join([row(3), json.dumps({"context": "C", "query": "Q?", "outputs": ["a"]}),
                   json.dumps({"input": 5}), json.dumps({"outputs": ["x"]}),
                   json.dumps({"input": "  "})]) + "\n",
}


def add(tar: tarfile.TarFile, name: str, data: bytes, **kw) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in kw.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data))


def make_tgz(path: Path, files: dict[str, str], evil: bool = False) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            add(tar, name, text.encode())
        if evil:
            add(tar, "../escaped.jsonl", row(9).encode())
            add(tar, "/abs/escaped.jsonl", row(9).encode())
            link = tarfile.TarInfo("data/ruler/cwe/validation_4096.jsonl")
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(link)
    return path


def test_tarball_rows_round_robin(tmp_path):
    tgz = make_tgz(tmp_path / "data_debug.tgz", FILES)
    out = tmp_path / "out"
    wl = load_ruler(tgz, data_dir=out)
    ids = [r.request_id for r in wl.requests]
    # files sorted by (task, length), one row from each in turn
    assert ids == ["ruler-niah_single_1-4096-1", "ruler-niah_single_1-8192-1",
                   "ruler-qa_1-4096-1", "ruler-vt-4096-1", "ruler-niah_single_1-4096-2",
                   "ruler-qa_1-4096-2"]
    first = wl.requests[0]
    assert first.prompt == "haystack 0 question? Answer:"  # answer_prefix appended
    assert first.meta["task"] == "niah_single_1" and first.meta["length"] == 4096
    assert first.meta["outputs"] == ["v0"] and first.meta["row_length"] == 4000
    assert wl.requests[3].prompt == "pretty row"  # a .json holding one indented row
    assert wl.requests[4].prompt == "haystack 1 question?"  # no prefix on that row
    assert wl.requests[5].prompt == "C\n\nQ?"  # HELMET-style row
    assert dict(wl.skipped) == {"invalid_json": 1, "wrong_type": 1, "missing_field": 1,
                                "empty_input": 1, "not_a_row_file": 1}
    assert (out / "ruler" / "data_debug" / "data" / "ruler" / "qa_1").is_dir()
    assert wl.source["file"] == str(tgz) and len(wl.source["sha256"]) == 64
    # second load reuses the extraction; a directory holding the tarball works too
    again = load_ruler(tmp_path, data_dir=out, limit=2)
    assert [r.request_id for r in again.requests] == ids[:2]
    assert [r.request_id for r in load_ruler(out / "ruler" / "data_debug",
                                             tasks=["qa_1"]).requests] == [ids[2], ids[5]]
    assert len(load_ruler(tgz, data_dir=out, lengths=[8192]).requests) == 1


def test_unsafe_members_are_not_extracted(tmp_path):
    tgz = make_tgz(tmp_path / "data_debug.tgz", FILES, evil=True)
    out = tmp_path / "deep" / "out"
    wl = load_ruler(tgz, data_dir=out)
    assert wl.skipped["unsafe_tar_member"] == 3
    assert not (out / "escaped.jsonl").exists() and not (tmp_path / "deep" / "escaped.jsonl")\
        .exists() and not Path("/abs/escaped.jsonl").exists()
    assert not (out / "ruler" / "data_debug" / "data" / "ruler" / "cwe").exists()
    assert len(wl.requests) == 6


@pytest.mark.parametrize(("rel", "expected"), [
    ("data/ruler/cwe/validation_65536.jsonl", ("cwe", 65536)),
    ("synthetic/16384/data/vt/validation.jsonl", ("vt", 16384)),
    ("niah_multikey_2_32768.jsonl", ("niah_multikey_2", 32768)),
    ("fwe/test.jsonl", ("fwe", None)),
    ("niah_single_1.jsonl", ("niah_single_1", None)),
    ("synthetic/4096/data/niah_single_3/validation.jsonl", ("niah_single_3", 4096)),
    ("ruler/1/niah_single_2/validation.jsonl", ("niah_single_2", None)),
])
def test_task_and_length_from_path(rel, expected):
    assert task_and_length(Path(rel)) == expected


def test_missing_inputs(tmp_path):
    with pytest.raises(DatasetNotFound, match="--ruler-tgz"):
        load_ruler(tmp_path / "nope.tgz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFound, match="no \\*.jsonl"):
        load_ruler(tmp_path / "empty")
    (tmp_path / "bad.tgz").write_bytes(b"not a tarball")
    with pytest.raises(DatasetNotFound, match="cannot extract"):
        load_ruler(tmp_path / "bad.tgz", data_dir=tmp_path / "x")
