"""ModelArgs: json loading, validation errors naming the field, YaRN numbers of the 671B config."""

from __future__ import annotations

import json
import math
import sys

import pytest

from kvtier.model.args import CONFIG_DIR, ConfigError, ModelArgs


def test_args_module_does_not_import_torch():
    import subprocess

    code = "import sys, kvtier.model.args; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_671b_config_and_yarn_numbers():
    a = ModelArgs.from_json(CONFIG_DIR / "config_671B_v3.2.json")
    assert (a.max_seq_len, a.max_batch_size, a.dtype, a.scale_fmt) == (16384, 1, "fp8", "ue8m0")
    assert (a.dim, a.n_layers, a.n_heads, a.n_routed_experts, a.index_topk) == (
        7168,
        61,
        128,
        256,
        2048,
    )
    assert a.yarn
    assert a.yarn_range == (10, 23)
    assert a.softmax_scale == pytest.approx(0.135234, abs=5e-7)
    m = 0.1 * math.log(40) + 1
    assert m == pytest.approx(1.368888, abs=1e-6)
    assert a.softmax_scale == pytest.approx(192**-0.5 * m * m)


def test_tiny_configs_have_no_yarn_and_load():
    tiny = ModelArgs.builtin("tiny")
    assert not tiny.yarn
    assert tiny.softmax_scale == pytest.approx((64 + 32) ** -0.5)
    demo = ModelArgs.builtin("demo")
    assert demo.vocab_size == 129280 and demo.index_topk < demo.max_seq_len


def test_overrides_and_roundtrip(tmp_path):
    a = ModelArgs.builtin("tiny", indexer_exact=True, max_seq_len=512)
    assert a.indexer_exact and a.max_seq_len == 512
    p = tmp_path / "c.json"
    p.write_text(json.dumps(a.to_dict()))
    assert ModelArgs.from_json(p) == a


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"dim": 0}, "dim"),
        ({"dim": 192}, "dim"),
        ({"moe_inter_dim": 64}, "moe_inter_dim"),
        ({"dim": "7168"}, "dim"),
        ({"n_layers": 2.5}, "n_layers"),
        ({"dtype": "fp16"}, "dtype"),
        ({"scale_fmt": "e8m0"}, "scale_fmt"),
        ({"score_func": "relu"}, "score_func"),
        ({"q_lora_rank": 0}, "q_lora_rank"),
        ({"n_expert_groups": 3}, "n_expert_groups"),
        ({"n_limited_groups": 5}, "n_limited_groups"),
        ({"n_dense_layers": 9}, "n_dense_layers"),
        ({"index_head_dim": 64}, "index_head_dim"),
        ({"kv_lora_rank": 100}, "kv_lora_rank"),
        ({"v1": "yes"}, "v1"),
        ({"route_scale": -1}, "route_scale"),
        ({"no_such_field": 1}, "no_such_field"),
    ],
)
def test_invalid_fields_are_named(tmp_path, patch, field):
    base = json.loads((CONFIG_DIR / "config_tiny.json").read_text())
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({**base, **patch}))
    with pytest.raises(ConfigError) as err:
        ModelArgs.from_json(p)
    msg = str(err.value)
    assert f"'{field}'" in msg and str(p) in msg


def test_exact_mode_relaxes_fp8_only_constraints():
    ModelArgs.builtin("tiny", dtype="fp32", indexer_exact=True, index_head_dim=64, kv_lora_rank=96)


def test_bad_json_and_missing_file(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('{"dim": 1,\n  oops}')
    with pytest.raises(ConfigError, match=r"broken.json: line 2: invalid JSON"):
        ModelArgs.from_json(p)
    with pytest.raises(ConfigError, match="cannot read config"):
        ModelArgs.from_json(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="unknown builtin config"):
        ModelArgs.builtin("huge")
    p.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        ModelArgs.from_json(p)
