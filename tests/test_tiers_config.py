"""Tier configs: presets load and cite sources; bad fields fail at start, naming the field."""

from __future__ import annotations

import json
import re

import msgspec
import pytest

from kvtier.sim.tiers.config import (
    PRESET_DIR,
    ConfigError,
    config_from_dict,
    load_tier_config,
    preset_names,
)


def _base() -> dict:
    return msgspec.to_builtins(load_tier_config("memfabric"))


def test_presets_load():
    assert {"memfabric", "mooncake"} <= set(preset_names())
    for name in preset_names():
        cfg = load_tier_config(name)
        assert list(cfg.tiers()) == ["hbm", "local_pool", "remote_pool"]
        assert cfg.name == name


def test_every_preset_parameter_cites_a_source():
    """Each parameter line carries a comment with a source tag ([M]easured, [S]tated,
    [T]ypical) or a kv_tiers.md section."""
    for path in PRESET_DIR.glob("*.toml"):
        for lineno, line in enumerate(path.read_text().splitlines(), start=1):
            if not re.match(r"^\s*[a-z_]+\s*=", line) or line.startswith("name "):
                continue
            assert re.search(r"#.*(\[[MST]|kv_tiers)", line), \
                f"{path.name}:{lineno}: parameter without a cited source: {line!r}"


def test_mooncake_remote_and_local_share_the_pcie_link():
    cfg = load_tier_config("mooncake")
    assert cfg.remote_pool.link == cfg.local_pool.link == "pcie"
    assert cfg.remote_pool.slice_bytes == 65536
    mf = load_tier_config("memfabric")
    assert mf.remote_pool.link != mf.local_pool.link


def test_json_config_round_trip(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_bytes(msgspec.json.encode(load_tier_config("mooncake")))
    assert load_tier_config(path) == load_tier_config("mooncake")


def test_unknown_field_is_named(tmp_path):
    data = _base()
    data["remote_pool"]["read_bw_gbs"] = 10.0
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"bad\.json.*read_bw_gbs.*\$\.remote_pool"):
        load_tier_config(path)


def test_unknown_top_level_field_in_toml(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text((PRESET_DIR / "memfabric.toml").read_text() + "\nwrite_polcy = 'x'\n")
    with pytest.raises(ConfigError, match="write_polcy"):
        load_tier_config(path)


@pytest.mark.parametrize(("tier", "field", "value", "pattern"), [
    ("hbm", "read_bw_gb_s", -1.0, r"\$\.hbm\.read_bw_gb_s"),
    ("local_pool", "max_batch", 0, r"\$\.local_pool\.max_batch"),
    ("remote_pool", "capacity_bytes", "lots", r"\$\.remote_pool\.capacity_bytes"),
    ("remote_pool", "method", "carrier_pigeon", r"\$\.remote_pool\.method"),
    ("remote_pool", "nodes", 0, r"\$\.remote_pool\.nodes"),
])
def test_bad_values_name_the_field(tier, field, value, pattern):
    data = _base()
    data[tier][field] = value
    with pytest.raises(ConfigError, match=pattern):
        config_from_dict(data)


def test_missing_required_field_is_named():
    data = _base()
    del data["local_pool"]["link"]
    with pytest.raises(ConfigError, match=r"link.*\$\.local_pool"):
        config_from_dict(data)


def test_undeclared_link_is_named():
    data = _base()
    data["remote_pool"]["link"] = "infiniband"
    with pytest.raises(ConfigError, match=r"remote_pool\.link.*infiniband"):
        config_from_dict(data)


def test_hbm_method_checked():
    data = _base()
    data["hbm"]["method"] = "rdma_sg"
    with pytest.raises(ConfigError, match=r"hbm\.method"):
        config_from_dict(data)
    data = _base()
    data["local_pool"]["method"] = "hbm"
    with pytest.raises(ConfigError, match=r"local_pool\.method"):
        config_from_dict(data)


def test_fetch_granularity_checked():
    data = _base()
    data["fetch_granularity"] = 5
    with pytest.raises(ConfigError, match="fetch_granularity"):
        config_from_dict(data)
    data["block_size"], data["fetch_granularity"] = 512, 1
    with pytest.raises(ConfigError, match="fetch_granularity.*64 sub-blocks"):
        config_from_dict(data)


def test_pools_are_optional_and_overrides_merge():
    data = _base()
    del data["local_pool"], data["remote_pool"]
    cfg = config_from_dict(data)
    assert list(cfg.tiers()) == ["hbm"]
    cfg = load_tier_config("memfabric", {"hbm": {"capacity_bytes": 1024}, "block_size": 16})
    assert cfg.hbm.capacity_bytes == 1024 and cfg.block_size == 16
    assert cfg.hbm.read_bw_gb_s == 3350.0


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="memfabric"):
        load_tier_config("nosuchpreset")


def test_remote_capacity_is_per_node():
    cfg = load_tier_config("memfabric")
    assert cfg.remote_pool.total_capacity_bytes == cfg.remote_pool.capacity_bytes * cfg.remote_pool.nodes
    assert cfg.remote_pool.latency_us == pytest.approx(
        cfg.remote_pool.base_latency_us + cfg.remote_pool.hops * cfg.remote_pool.per_hop_latency_us)
