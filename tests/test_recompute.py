"""``replay --model-config``: the model dims recompute FLOPs come from, read from the same
config files ``kvtier run --config`` takes, with typos named (a typo used to keep the 671B
default silently)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from kvtier.cli import main
from kvtier.sim.synth import SynthConfig, synth_stream, write_trace
from kvtier.sim.tiers.config import ConfigError
from kvtier.sim.tiers.recompute import (
    OTHER_CONFIG_FIELDS,
    ModelDims,
    load_model_dims,
    per_token_flops,
)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "model" / "configs").glob("*.json"))


def test_the_field_list_is_the_models():
    from kvtier.model.args import ModelArgs

    model = {f.name for f in dataclasses.fields(ModelArgs)}
    assert set(ModelDims.__struct_fields__) | OTHER_CONFIG_FIELDS == model
    assert set(ModelDims.__struct_fields__) <= model


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads_with_its_dims(path):
    data = json.loads(path.read_text())
    dims = load_model_dims(path)
    for name in ModelDims.__struct_fields__:
        if name in data:
            assert getattr(dims, name) == data[name]


def test_671b_config_is_the_default():
    big = [p for p in CONFIGS if "671B" in p.name]
    assert big and load_model_dims(big[0]) == ModelDims()
    tiny = [p for p in CONFIGS if "tiny" in p.name]
    assert per_token_flops(load_model_dims(tiny[0])) < per_token_flops(ModelDims()) / 1000


@pytest.mark.parametrize(("data", "match"), [
    ({"n_layer": 4}, r"unknown field 'n_layer'; did you mean 'n_layers'\?"),
    ({"dimm": 4}, r"unknown field 'dimm'; did you mean 'dim'\?"),
    ({"hidden_size": 4}, "Hugging Face config.json"),
    ({"dim": "big"}, r"Expected `int`, got `str` - at `\$.dim`"),
    ([1, 2], "expected a JSON object"),
])  # fmt: skip
def test_bad_configs_name_the_field(tmp_path, data, match):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=match):
        load_model_dims(p)


def test_replay_flag_fails_at_start_in_one_line(tmp_path, capsys):
    trace = tmp_path / "t"
    write_trace(synth_stream(SynthConfig(requests=2, layers=2, steps=3, prompt_len=64, topk=8,
                                         block_size=16)), trace)
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"n_layer": 4}))
    out = tmp_path / "o"
    rc = main(["replay", str(trace), "--out", str(out), "--model-config", str(cfg),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "unknown field 'n_layer'" in err
    assert not out.exists()
