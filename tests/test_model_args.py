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


#: the reference ModelArgs dataclass (dsa_model.md §2): field -> default, written out here
REFERENCE_DEFAULTS = {
    "max_batch_size": 8, "max_seq_len": 16384, "dtype": "bf16", "scale_fmt": None,
    "vocab_size": 102400, "dim": 2048, "inter_dim": 10944, "moe_inter_dim": 1408,
    "n_layers": 27, "n_dense_layers": 1, "n_heads": 16, "n_routed_experts": 64,
    "n_shared_experts": 2, "n_activated_experts": 6, "n_expert_groups": 1,
    "n_limited_groups": 1, "score_func": "softmax", "route_scale": 1.0, "q_lora_rank": 0,
    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "original_seq_len": 4096, "rope_theta": 10000.0, "rope_factor": 40, "beta_fast": 32,
    "beta_slow": 1, "mscale": 1.0, "index_n_heads": 64, "index_head_dim": 128,
    "index_topk": 2048,
}  # fmt: skip


def test_every_reference_field_is_accepted(tmp_path):
    """A reference config.json (any subset of the reference's fields) loads unchanged; the
    fields a reference config does not set take the reference's defaults."""
    fields = {**REFERENCE_DEFAULTS, "q_lora_rank": 1536}  # the default 0 breaks the indexer
    p = tmp_path / "config.json"
    p.write_text(json.dumps(fields))
    a = ModelArgs.from_json(p)
    assert {k: getattr(a, k) for k in fields} == fields
    bare = ModelArgs.from_dict({"q_lora_rank": 1536})
    assert {k: getattr(bare, k) for k in fields} == fields


def test_router_bias_follows_the_reference_rule():
    # the reference creates ffn.gate.bias only when dim == 7168
    assert ModelArgs.builtin("671B_v3.2").has_gate_bias
    tiny = ModelArgs.builtin("tiny")
    assert tiny.gate_bias is None and not tiny.has_gate_bias
    assert ModelArgs.builtin("tiny", gate_bias=True).has_gate_bias
    assert not ModelArgs.builtin("671B_v3.2", gate_bias=False).has_gate_bias
    with pytest.raises(ConfigError, match="field 'gate_bias' must be bool | None"):
        ModelArgs.builtin("tiny", gate_bias="yes")


@pytest.mark.parametrize(
    "typo, suggestion",
    [("index_top_k", "index_topk"), ("n_layer", "n_layers"), ("gatebias", "gate_bias"),
     ("rotary_dim", None), ("use_cache", None)],
)  # fmt: skip
def test_a_typo_fails_naming_the_field_and_the_closest_one(tmp_path, typo, suggestion):
    base = json.loads((CONFIG_DIR / "config_tiny.json").read_text())
    p = tmp_path / "typo.json"
    p.write_text(json.dumps({**base, typo: 1}))
    with pytest.raises(ConfigError) as err:
        ModelArgs.from_json(p)
    msg = str(err.value)
    assert msg.startswith(f"{p}: unknown field {typo!r}")
    if suggestion:
        assert f"did you mean {suggestion!r}?" in msg
    else:
        assert "did you mean" not in msg


def test_a_hugging_face_config_is_recognised(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"hidden_size": 7168, "num_hidden_layers": 61}))
    with pytest.raises(ConfigError, match="this is a Hugging Face config.json"):
        ModelArgs.from_json(p)


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
