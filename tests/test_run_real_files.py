"""``kvtier run`` on real files as a new user meets them: filtering before the model loads,
runs that keep nothing, the Mooncake/Azure names, the serving log's one schema."""

from __future__ import annotations

import json

import pytest
from run_helpers import SHARED_DATA, demo_bundle

from kvtier.cli import build_parser
from kvtier.runners import launch

BURSTGPT = SHARED_DATA / "burstgpt" / "BurstGPT_1.head400.csv"


def _args(argv):
    return build_parser().parse_args(["run", *argv])


def test_requests_are_filtered_before_the_model_loads(tmp_path, monkeypatch):
    """Loading the weights takes seconds to minutes: the length filter (tokenizer and the
    config's max_seq_len only) runs first."""
    import kvtier.runners.model_setup as model_setup
    import kvtier.runners.prepare as prepare_mod

    events = []
    real_prepare, bundle = prepare_mod.prepare, demo_bundle()

    def prepare(*a, **k):
        events.append("prepare")
        return real_prepare(*a, **k)

    def load_model(*a, **k):
        events.append("load_model")
        return bundle

    monkeypatch.setattr(prepare_mod, "prepare", prepare)
    monkeypatch.setattr(model_setup, "load_model", load_model)
    csv = tmp_path / "b.csv"
    csv.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                   "5,ChatGPT,12,2,14,Conversation log\n")
    rc = launch.launch(_args(["burstgpt", "--burstgpt-csv", str(csv), "--trace-out",
                              str(tmp_path / "out"), "--max-new-tokens", "2"]))  # fmt: skip
    assert rc == 0
    assert events == ["prepare", "load_model"]
