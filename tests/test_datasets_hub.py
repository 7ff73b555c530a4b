"""Download helpers, with the hub replaced by fakes (tests never touch the network)."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest

from kvtier.runners.datasets import load_burstgpt
from kvtier.runners.datasets.common import file_revision
from kvtier.runners.datasets.hub import main


@pytest.fixture(autouse=True)
def _restore_hf_env(monkeypatch):
    """``hub_env`` sets HF_* variables; registering them here restores them afterwards."""
    for var in ("HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE"):
        monkeypatch.setenv(var, "unset-by-test")


def test_file_download_goes_under_dest_and_prints_flag(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_download(repo_id, filename, repo_type, revision, local_dir):
        calls.append((repo_id, filename, repo_type, revision, os.environ["HF_HUB_CACHE"]))
        out = Path(local_dir) / filename
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"x")
        meta = Path(local_dir) / ".cache" / "huggingface" / "download" / f"{filename}.metadata"
        meta.parent.mkdir(parents=True)
        meta.write_text("a" * 40 + "\netag\n1700000000.0\n")  # hf_hub_download's layout
        return str(out)

    monkeypatch.setitem(sys.modules, "huggingface_hub",
                        types.SimpleNamespace(hf_hub_download=fake_download))
    assert main(["ruler", "--file", "data_100_samples.tgz", "--dest", str(tmp_path)]) == 0
    want = tmp_path / "allenai__ruler_data" / "data_100_samples.tgz"
    assert want.is_file()
    assert calls == [("allenai/ruler_data", "data_100_samples.tgz", "dataset", None,
                      str(tmp_path / "hub"))]
    out = capsys.readouterr().out
    assert f"--ruler-tgz {want}" in out
    assert file_revision(want) == "a" * 40
    assert os.environ["HF_HOME"] == str(tmp_path)
    assert os.environ["HF_DATASETS_CACHE"] == str(tmp_path / "datasets")


def test_burstgpt_export_loads(tmp_path, monkeypatch, capsys):
    class FakeSplit:
        def to_csv(self, path, index):
            assert index is False
            Path(path).write_text("Timestamp,Model,Request tokens,Response tokens,"
                                  "Total tokens,Log Type\n5,GPT-4,10,2,12,API log\n")

    commit = "0123456789abcdef0123456789abcdef01234567"

    class FakeApi:
        def dataset_info(self, repo, revision):
            assert (repo, revision) == ("lzzmm/BurstGPT", None)
            return types.SimpleNamespace(sha=commit)

    def fake_load(repo, split, revision):
        assert (repo, split, revision) == ("lzzmm/BurstGPT", "train", commit)
        return FakeSplit()

    monkeypatch.setenv("DATAS_DIR", str(tmp_path))
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load))
    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(HfApi=FakeApi))
    assert main(["burstgpt"]) == 0
    csv = tmp_path / "lzzmm__BurstGPT" / "burstgpt_train.csv"
    assert f"--burstgpt-csv {csv}" in capsys.readouterr().out
    wl = load_burstgpt(tmp_path)
    assert [r.prompt_len for r in wl.requests] == [10]
    assert wl.source["revision"] == commit  # provenance from the export's sidecar


def test_failure_is_one_line(tmp_path, monkeypatch, capsys):
    def boom(**kwargs):
        raise OSError("hub unreachable\nsecond line")

    monkeypatch.setitem(sys.modules, "huggingface_hub",
                        types.SimpleNamespace(hf_hub_download=boom))
    assert main(["sharegpt", "--dest", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == "download sharegpt: error: OSError: hub unreachable\n"
