"""TieredBackend against straightforward references: LRU/FIFO/OPT hit counts, the cost
formula, link contention, placement/prefetch/migration, fetch vs recompute; plus hypothesis
properties (capacity, conservation, determinism)."""

from __future__ import annotations

import math
from collections import OrderedDict

import msgspec
import numpy as np
import pytest
from cache_refs import ref_fifo, ref_lru, ref_opt
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.backend import LayerAccess
from kvtier.policies.placement import LocalFirst
from kvtier.schema import record_encoder
from kvtier.sim.access import AccessStream, rebucket
from kvtier.sim.replay import drive_stream
from kvtier.sim.synth import SynthConfig, synth_stream
from kvtier.sim.tiers.backend import TieredBackend
from kvtier.sim.tiers.config import ConfigError, config_from_dict, load_tier_config
from kvtier.sim.tiers.recompute import (
    ModelDims,
    break_even_tokens,
    fetch_us,
    prefill_flops,
    recompute_us,
)

BS = 16
KVB = 656
BLOCK = BS * KVB


def _config(hbm_blocks: int, pools: bool = False, **top) -> object:
    data = msgspec.to_builtins(load_tier_config("memfabric"))
    data.update(block_size=BS, kv_bytes_per_token=KVB, on_release="keep", **top)
    data["hbm"]["capacity_bytes"] = hbm_blocks * BLOCK
    if not pools:
        del data["local_pool"], data["remote_pool"]
    return config_from_dict(data)


def _stream(**kw) -> AccessStream:
    base = dict(requests=3, layers=3, steps=8, prompt_len=512, prompt_jitter=64, topk=64,
                block_size=BS, stagger=2, seed=1)
    base.update(kw)
    return synth_stream(SynthConfig(**base))


# ---------------------------------------------------------------- references


def _plain(results) -> list:
    """KVFetch results as plain JSON values (hit_blocks may be numpy arrays)."""
    return msgspec.json.decode(record_encoder().encode(results))


def _hbm_hits(b: TieredBackend, results) -> int:
    """HBM's resident hits; the records' hbm lists also hold the unserved refills."""
    listed = sum(len(r.hbm.hit_blocks) for r in results)
    assert listed == b.tiers["hbm"].hits + b.tiers["hbm"].refilled == b.tiers["hbm"].hits + b.unserved
    return b.tiers["hbm"].hits


# ---------------------------------------------------------------- single tier == references


@pytest.mark.parametrize("cap", [0, 7, 40, 150, 10_000])
@pytest.mark.parametrize("pools", [False, True])
def test_hbm_lru_equals_reference(cap, pools):
    s = _stream()
    keys = rebucket(s, BS).keys().tolist()
    b = TieredBackend(_config(cap, pools=pools), num_layers=3)
    out = drive_stream(b, s)
    assert _hbm_hits(b, out) == ref_lru(keys, cap)
    assert b.accesses == len(keys)


@pytest.mark.parametrize("cap", [7, 40, 150])
def test_hbm_fifo_equals_reference(cap):
    s = _stream()
    keys = rebucket(s, BS).keys().tolist()
    b = TieredBackend(_config(cap), num_layers=3, eviction="fifo")
    assert _hbm_hits(b, drive_stream(b, s)) == ref_fifo(keys, cap)


@pytest.mark.parametrize("cap", [7, 40, 150])
def test_hbm_opt_equals_reference(cap):
    s = _stream(requests=2, steps=5)
    keys = rebucket(s, BS).keys()
    b = TieredBackend(_config(cap), num_layers=3, eviction="belady", future_keys=keys)
    assert _hbm_hits(b, drive_stream(b, s)) == ref_opt(keys.tolist(), cap)


def test_generic_policy_path_matches_fast_path():
    """A subclass of LRU takes the generic (method-call) path; results must not change."""
    from kvtier.policies.lru import LRUPolicy

    class SlowLRU(LRUPolicy):
        pass

    s = _stream()
    fast = TieredBackend(_config(40, pools=True), num_layers=3)
    slow = TieredBackend(_config(40, pools=True), num_layers=3, eviction=SlowLRU,
                         pool_eviction=SlowLRU)
    assert _plain(drive_stream(fast, s)) == _plain(drive_stream(slow, s))
    assert fast.summary()["tiers"] == slow.summary()["tiers"] | {
        "_totals": fast.summary()["tiers"]["_totals"]}


def test_offline_policy_needs_future():
    with pytest.raises(ConfigError, match="future"):
        TieredBackend(_config(10), num_layers=1, eviction="belady")
    with pytest.raises(ConfigError, match="write_through"):
        TieredBackend(_config(10, write_policy="write_back"), num_layers=1, eviction="belady",
                      future_keys=np.zeros(0, np.int64))


# ---------------------------------------------------------------- cost model


def _single(cfg, num_layers=1, **kw) -> TieredBackend:
    return TieredBackend(cfg, num_layers=num_layers, **kw)


def _access(step, layer, rows: dict[str, list[int]]) -> LayerAccess:
    ids = list(rows)
    blocks = [np.asarray(rows[r], dtype=np.int64) for r in ids]
    pos = [b * BS for b in blocks]
    return LayerAccess(step_idx=step, layer_id=layer, request_ids=ids, token_pos=pos,
                       block_ids=blocks, block_size=BS)


def test_cold_fetch_costs_the_formula():
    cfg = _config(1000, pools=True)
    b = _single(cfg)
    b.admit(0, 40 * BS)
    out = b.fetch(_access(0, 0, {0: list(range(40))}))[0]
    spec = cfg.local_pool
    expected = spec.latency_us + math.ceil(40 / spec.max_batch) * spec.per_op_us + 40 * BLOCK / (spec.read_bw_gb_s * 1e3)
    assert len(out.local_pool.hit_blocks) == 40
    assert out.local_pool.bytes_read == 40 * BLOCK
    assert out.local_pool.latency_us == pytest.approx(expected)
    assert out.hbm.latency_us is None and len(out.hbm.hit_blocks) == 0
    assert out.remote_pool.latency_us is None
    again = b.fetch(_access(0, 0, {0: list(range(40))}))[0]
    assert len(again.hbm.hit_blocks) == 40 and again.local_pool.latency_us is None
    assert again.hbm.latency_us == pytest.approx(40 * BLOCK / (cfg.hbm.read_bw_gb_s * 1e3))


def test_rdma_slices_and_batches():
    cfg = load_tier_config("mooncake", {"block_size": 256, "local_pool": {"capacity_bytes": 0}})
    b = _single(cfg)
    blk = 256 * KVB  # 167,936 B = 3 slices of 64 KB
    b.admit(0, 10 * 256)
    out = b.fetch(LayerAccess(0, 0, [0], [np.arange(10) * 256], [np.arange(10)], 256))[0]
    r = cfg.remote_pool
    ops = 10 * math.ceil(blk / r.slice_bytes)
    assert out.remote_pool.read_ops == ops == 30
    assert out.remote_pool.latency_us == pytest.approx(
        r.latency_us + math.ceil(ops / r.max_batch) * r.per_op_us + 10 * blk / (r.read_bw_gb_s * 1e3))


def _split_config(shared_link: bool):
    data = msgspec.to_builtins(load_tier_config("memfabric"))
    data.update(block_size=BS, kv_bytes_per_token=KVB)
    data["local_pool"]["capacity_bytes"] = 50 * BLOCK
    if shared_link:
        data["remote_pool"]["link"] = "pcie"
    return config_from_dict(data)


@pytest.mark.parametrize("shared", [False, True])
def test_contention_on_a_shared_link(shared):
    """100 prompt blocks: local_first fills the local pool (0..49), the rest go remote. One
    fetch reads 50 + 50 from both pools; on one link the two batches queue."""
    b = _single(_split_config(shared))
    b.admit(0, 100 * BS)
    assert b.tiers["local_pool"].policy.__len__() == 50
    both = b.fetch(_access(0, 0, {0: list(range(100))}))[0]
    alone = _single(_split_config(shared))
    alone.admit(0, 100 * BS)
    only_local = alone.fetch(_access(0, 0, {0: list(range(50))}))[0]
    only_remote = alone.fetch(_access(0, 0, {0: list(range(50, 100))}))[0]
    assert len(both.local_pool.hit_blocks) == len(both.remote_pool.hit_blocks) == 50
    slowest_alone = max(only_remote.remote_pool.latency_us, only_local.local_pool.latency_us)
    slowest_both = max(both.remote_pool.latency_us, both.local_pool.latency_us)
    if shared:
        total = only_remote.remote_pool.latency_us + only_local.local_pool.latency_us
        assert slowest_both == pytest.approx(total)
        assert slowest_both > slowest_alone
    else:
        assert slowest_both == pytest.approx(slowest_alone)


def test_background_writes_contend_on_a_half_duplex_link():
    def run(duplex: bool) -> float:
        data = msgspec.to_builtins(_config(1000, pools=True))
        data["links"]["pcie"]["duplex"] = duplex
        b = _single(config_from_dict(data))
        b.admit(7, 4000 * BS)  # a big prompt write queued on the pcie link
        b.admit(0, 10 * BS)
        return b.fetch(_access(0, 0, {0: list(range(10))}))[0].local_pool.latency_us
    assert run(False) > run(True) * 10


# ---------------------------------------------------------------- policies


def test_placement_replicas_and_free_ratio():
    cfg = _config(100, pools=True)
    b = _single(cfg, placement="local_first:replicas=2")
    b.admit(0, 4 * BS)
    assert len(b.tiers["local_pool"].policy) == 4 == len(b.tiers["remote_pool"].policy)
    small = msgspec.to_builtins(cfg)
    small["local_pool"]["capacity_bytes"] = 10 * BLOCK
    b = _single(config_from_dict(small), placement="free_ratio_first")
    b.admit(0, 8 * BS)  # local fills to 8/10 = 20 % free; remote stays ~100 % free
    assert len(b.tiers["local_pool"].policy) == 1  # first block only; then remote is freer
    assert len(b.tiers["remote_pool"].policy) == 7


class AlwaysLocal(LocalFirst):
    """Test placement: every block goes to the local pool, so overflow must demote."""

    def place(self, key, tiers, free_blocks):
        return ["local_pool"]


def test_pool_victims_demote_or_drop():
    data = msgspec.to_builtins(_config(100, pools=True))
    data["local_pool"]["capacity_bytes"] = 5 * BLOCK
    b = _single(config_from_dict(data), placement=f"{__file__}:AlwaysLocal")
    b.admit(0, 12 * BS)
    assert len(b.tiers["local_pool"].policy) == 5
    assert len(b.tiers["remote_pool"].policy) == 7
    assert b.tiers["remote_pool"].demoted_in == 7
    assert b.tiers["local_pool"].evictions == 7
    b = _single(config_from_dict(data), placement=f"{__file__}:AlwaysLocal:demote=false")
    b.admit(0, 12 * BS)
    assert b.tiers["local_pool"].dropped == 7
    assert len(b.tiers["remote_pool"].policy) == 0
    out = b.fetch(_access(0, 0, {0: list(range(12))}))[0]
    assert len(out.local_pool.hit_blocks) == 5
    assert b.unserved == 7


def test_prefetch_next_layer_turns_misses_into_hits():
    blocks = list(range(20))
    def run(prefetch: str) -> TieredBackend:
        b = TieredBackend(_config(1000, pools=True, layer_compute_us=50.0), num_layers=2,
                          prefetch=prefetch)
        b.admit(0, 20 * BS)
        for step in range(2):
            for layer in range(2):
                b.fetch(_access(step, layer, {0: blocks}))
        return b
    plain, pf = run("none"), run("this_step_prev_layer")
    assert plain.tiers["hbm"].hits == 40  # step 1 hits both layers
    assert pf.tiers["hbm"].hits == 60  # and layer 1 of step 0 was prefetched
    assert pf.prefetch_useful == 20
    assert pf.tiers["local_pool"].prefetch_blocks == 20
    assert pf.stall_total < plain.stall_total


def test_migration_promotes_hot_remote_blocks():
    data = msgspec.to_builtins(_config(0, pools=True))
    data["local_pool"]["capacity_bytes"] = 10 * BLOCK
    b = TieredBackend(config_from_dict(data), num_layers=1, migration="promote_hot:hot=2")
    b.admit(0, 20 * BS)  # blocks 0..9 fill the local pool, 10..19 go remote
    for step in range(3):
        b.fetch(_access(step, 0, {0: [10, 11]}))
    # hot=2 counts remote reads since the last step boundary: one per step never reaches 2
    assert b.migrated == 0
    b2 = TieredBackend(config_from_dict(data), num_layers=1, migration="promote_hot:hot=1")
    b2.admit(0, 20 * BS)
    first = b2.fetch(_access(0, 0, {0: [10, 11]}))[0]
    second = b2.fetch(_access(1, 0, {0: [10, 11]}))[0]
    assert len(first.remote_pool.hit_blocks) == 2
    assert b2.migrated == 2  # promoted into the full local pool, whose LRU victims go remote
    assert len(second.local_pool.hit_blocks) == 2 and len(second.remote_pool.hit_blocks) == 0
    assert b2.tiers["local_pool"].migrated_in == 2


def test_write_back_writes_on_eviction_only():
    b = _single(_config(2, pools=True, write_policy="write_back"))
    b.admit(0, 0)
    for t in range(3 * BS):
        b.append(0, 1)
        if t % BS == BS - 1:
            pass
    local = b.tiers["local_pool"]
    # 3 blocks dirty in an HBM of 2: the first was written back when evicted
    assert local.write_ops == 0  # nothing issued until the next fetch/summary flushes
    b.summary()
    assert local.write_bytes == BLOCK
    wt = _single(_config(2, pools=True))
    wt.admit(0, 0)
    wt.append(0, 3 * BS)
    wt.summary()
    assert wt.tiers["local_pool"].write_bytes == 3 * BLOCK


def test_prefix_sharing_aliases_blocks():
    b = _single(_config(1000, pools=True))
    b.admit(0, 4 * BS, prefix_hashes=[11, 12, 13])
    b.admit(1, 4 * BS, prefix_hashes=[11, 12, 99])
    assert len(b.tiers["local_pool"].policy) == 4 + 2  # b shares 2 blocks, writes 2
    b.fetch(_access(0, 0, {0: [0, 1, 2, 3]}))
    out = b.fetch(_access(0, 0, {1: [0, 1, 2, 3]}))[0]
    assert len(out.hbm.hit_blocks) == 2 and len(out.local_pool.hit_blocks) == 2


def test_release_drops_all_but_registered_prefix_blocks():
    data = msgspec.to_builtins(_config(1000, pools=True))
    data["on_release"] = "drop"
    b = _single(config_from_dict(data))
    b.admit(0, 4 * BS, prefix_hashes=[1, 2])
    b.fetch(_access(0, 0, {0: [0, 1, 2, 3]}))
    b.release(0)
    assert sorted(k & 0xFFFFFF for k in b.tiers["local_pool"].policy.keys()) == [0, 1]
    with pytest.raises(KeyError, match="released"):
        b.fetch(_access(1, 0, {0: [0]}))
    with pytest.raises(KeyError, match="not admitted"):
        b.fetch(_access(1, 0, {99: [0]}))


def test_fetch_granularity_reads_touched_sub_blocks():
    cfg = _config(1000, pools=True, fetch_granularity=4)
    b = _single(cfg)
    b.admit(0, 4 * BS)
    pos = np.array([0, 1, 17, 63], dtype=np.int64)  # sub-blocks 0 | 4 | 15 -> blocks 0, 1, 3
    acc = LayerAccess(0, 0, [0], [pos], [np.unique(pos // BS)], BS)
    out = b.fetch(acc)[0]
    assert len(out.local_pool.hit_blocks) == 3
    assert out.local_pool.bytes_read == 3 * 4 * KVB
    pos2 = np.array([2, 5], dtype=np.int64)  # sub-block 0 resident, 1 missing
    out2 = b.fetch(LayerAccess(0, 0, [0], [pos2], [np.array([0])], BS))[0]
    assert len(out2.hbm.hit_blocks) == 0 and out2.local_pool.bytes_read == 4 * KVB
    out3 = b.fetch(LayerAccess(0, 0, [0], [pos2], [np.array([0])], BS))[0]
    assert len(out3.hbm.hit_blocks) == 1 and out3.hbm.bytes_read == 2 * 4 * KVB


# ---------------------------------------------------------------- fetch vs recompute


def test_prefill_flops_closed_form_matches_a_loop():
    m = ModelDims(dim=64, inter_dim=128, moe_inter_dim=32, n_layers=3, n_dense_layers=1,
                  n_heads=4, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2,
                  q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                  v_head_dim=16, index_n_heads=2, index_head_dim=16, index_topk=5, vocab_size=100)
    from kvtier.sim.tiers.recompute import per_token_flops

    def loop(n: int) -> float:
        total = 0.0
        for p in range(n):
            total += per_token_flops(m)
            k = min(p + 1, m.index_topk)
            total += m.n_layers * 2 * m.n_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim) * k
            total += m.n_layers * 2 * m.index_n_heads * (m.index_head_dim + 1) * (p + 1)
        return total + (2 * m.dim * m.vocab_size if n else 0)

    lens = np.array([0, 1, 4, 5, 6, 37])
    assert prefill_flops(m, lens) == pytest.approx([loop(int(n)) for n in lens])


def test_break_even_matches_a_scan():
    cfg = load_tier_config("mooncake", {"recompute": {"gpu_tflops": 989.0, "mfu": 0.5,
                                                      "max_prefix_tokens": 4096}})
    m = ModelDims(n_layers=4, dim=512, inter_dim=1024, moe_inter_dim=256, n_heads=8,
                  q_lora_rank=128, n_dense_layers=1, index_topk=64)
    be = break_even_tokens(m, cfg, cfg.remote_pool, 64)
    grid = np.arange(1, 4097)
    f = fetch_us(cfg.remote_pool, cfg, m.n_layers, grid, 64)
    r = recompute_us(m, cfg.recompute, grid)
    first = next((int(n) for n, a, c in zip(grid, f, r, strict=True) if a <= c), None)
    assert be == first
    # a small model: short prefixes are cheaper to recompute than the pool's fixed latency
    assert be is not None and 1 < be < 4096
    assert break_even_tokens(ModelDims(), cfg, cfg.remote_pool, 64) == 1  # 671B: always fetch


def test_summary_sections():
    s = _stream()
    b = TieredBackend(_config(40, pools=True), num_layers=3)
    drive_stream(b, s)
    out = b.summary()
    assert set(out) == {"tiers", "stall", "fetch_vs_recompute"}
    fvr = out["fetch_vs_recompute"]
    assert fvr["requests"] == 3 and set(fvr["per_request"]) == {str(r) for r in s.request_ids}
    stall = out["stall"]
    assert sum(stall["per_step_us"].values()) == pytest.approx(stall["total_us"])
    assert sum(stall["per_layer_us"].values()) == pytest.approx(stall["total_us"])
    for name in ("hbm", "local_pool", "remote_pool"):
        lat = out["tiers"][name]["latency_us"]
        if lat["count"]:
            assert lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]


# ---------------------------------------------------------------- properties


@st.composite
def _streams(draw):
    n_req = draw(st.integers(1, 3))
    n_layers = draw(st.integers(1, 3))
    steps = draw(st.integers(1, 4))
    prompt = [draw(st.integers(1, 6 * BS)) for _ in range(n_req)]
    req, layer, step, seq, chunks = [], [], [], [], []
    for t in range(steps):
        for li in range(n_layers):
            for r in range(n_req):
                n = prompt[r] + t + 1
                k = draw(st.integers(1, min(n, 40)))
                sel = np.unique(np.asarray(draw(st.lists(st.integers(0, n - 1), min_size=k, max_size=k))))
                req.append(r)
                layer.append(li)
                step.append(t)
                seq.append(n)
                chunks.append(sel.astype(np.int64))
    offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
    np.cumsum([c.shape[0] for c in chunks], out=offsets[1:])
    s = AccessStream(request_ids=list(range(n_req)), req=np.array(req),
                     layer=np.array(layer), step=np.array(step), seq_len=np.array(seq),
                     offsets=offsets, pos=np.concatenate(chunks), block_size=BS)
    return s, n_layers


@settings(max_examples=40, deadline=None)
@given(data=_streams(), hbm=st.integers(0, 30), local=st.integers(0, 20),
       remote=st.integers(0, 40), gran=st.sampled_from([None, 4, 16]),
       write=st.sampled_from(["write_through", "write_back"]),
       release=st.sampled_from(["drop", "keep"]),
       prefetch=st.sampled_from(["none", "this_step_prev_layer", "prev_step_same_layer"]))
def test_properties(data, hbm, local, remote, gran, write, release, prefetch):
    s, n_layers = data
    cfg_data = msgspec.to_builtins(_config(hbm, pools=True))
    cfg_data["local_pool"]["capacity_bytes"] = local * BLOCK
    cfg_data["remote_pool"]["capacity_bytes"] = remote * BLOCK
    cfg_data["remote_pool"]["nodes"] = 1
    cfg_data.update(fetch_granularity=gran, write_policy=write, on_release=release)
    cfg = config_from_dict(cfg_data)

    def run():
        b = TieredBackend(cfg, num_layers=n_layers, prefetch=prefetch)
        return b, drive_stream(b, s), b.summary()

    b, out, summ = run()
    blocks = rebucket(s, BS)
    per_record = np.diff(blocks.offsets)
    # the tiers' lists partition every record's blocks; hits + refills + pool reads = accesses
    for i, r in enumerate(out):
        want = blocks.blocks[blocks.offsets[i]:blocks.offsets[i + 1]].tolist()
        lists = [np.asarray(t.hit_blocks).tolist() for t in (r.hbm, r.local_pool, r.remote_pool)]
        assert sorted(x for x in lists for x in x) == want
        assert all(t == sorted(set(t)) for t in lists)
        assert all(len(lst) == t.batch_size for lst, t in zip(lists, (r.hbm, r.local_pool, r.remote_pool),
                                                             strict=True))
    assert b.accesses == int(per_record.sum())
    tot = summ["tiers"]
    assert (tot["hbm"]["hit_blocks"] + tot["hbm"]["refilled_blocks"] + tot["local_pool"]["hit_blocks"]
            + tot["remote_pool"]["hit_blocks"]) == b.accesses
    assert tot["hbm"]["refilled_blocks"] == b.unserved == tot["_totals"]["unserved_blocks"]
    # capacity never exceeded
    for t in b.tiers.values():
        assert t.peak <= t.capacity
        assert len(t.policy) <= t.capacity
    # bytes conserved: per-record bytes add up to the tier totals; whole blocks = block bytes
    for name in ("hbm", "local_pool", "remote_pool"):
        rows = [getattr(r, name) for r in out]
        assert sum(x.bytes_read for x in rows) == summ["tiers"][name]["bytes_read"]
        t = summ["tiers"][name]
        assert sum(len(x.hit_blocks) for x in rows) == t["hit_blocks"] + t["refilled_blocks"]
        if gran in (None, BS):
            assert all(x.bytes_read == len(x.hit_blocks) * BLOCK for x in rows)
        else:
            assert all(x.bytes_read <= len(x.hit_blocks) * BLOCK for x in rows)
        assert all((x.latency_us is None) == (len(x.hit_blocks) == 0) for x in rows)
    # same input -> same output
    _, out2, summ2 = run()
    assert _plain(out2) == _plain(out)
    assert summ2 == summ


class PerBlockLocalFirst(LocalFirst):
    """local_first without the batched ``place_many`` path: one ``place`` call per block."""


@settings(max_examples=15, deadline=None)
@given(local=st.integers(0, 12), remote=st.integers(0, 12),
       prompts=st.lists(st.integers(0, 10 * BS), min_size=1, max_size=4))
def test_batched_placement_equals_per_block(local, remote, prompts):
    data = msgspec.to_builtins(_config(4, pools=True))
    data["local_pool"]["capacity_bytes"] = local * BLOCK
    data["remote_pool"]["capacity_bytes"] = remote * BLOCK
    data["remote_pool"]["nodes"] = 1
    cfg = config_from_dict(data)
    fast = _single(cfg, num_layers=2)
    slow = _single(cfg, num_layers=2)
    slow.placement = PerBlockLocalFirst()
    assert slow.placement.place_many(3, ["local_pool"], {}) is None
    for i, n in enumerate(prompts):
        for b in (fast, slow):
            b.admit(f"r{i}", n)
            b.append(f"r{i}", 3)
    for name in ("local_pool", "remote_pool"):
        assert list(fast.tiers[name].policy.keys()) == list(slow.tiers[name].policy.keys())
    assert fast.summary()["tiers"] | {"_totals": None} == slow.summary()["tiers"] | {"_totals": None}


@settings(max_examples=150, deadline=None)
@given(cap=st.integers(1, 12), resident=st.lists(st.integers(0, 30), max_size=12, unique=True),
       keys=st.lists(st.integers(0, 30), max_size=15, unique=True), refresh=st.booleans())
def test_dict_batch_equals_the_per_key_loop(cap, resident, keys, refresh):
    from kvtier.sim.tiers.backend import _dict_batch

    resident = resident[:cap]
    ref = OrderedDict.fromkeys(resident)
    miss, victims = [], []
    for k in keys:
        if k in ref:
            if refresh:
                ref.move_to_end(k)
        else:
            ref[k] = None
            miss.append(k)
            if len(ref) > cap:
                victims.append(ref.popitem(last=False)[0])
    d = OrderedDict.fromkeys(resident)
    got = _dict_batch(d, refresh, cap, keys)
    if got is None:  # declined (a batch key is among the oldest its misses evict): untouched
        assert list(d) == resident
        excess = len(resident) + sum(k not in resident for k in keys) - cap
        assert excess > len(resident) or set(keys) & set(resident[:excess])
    else:
        assert got == (miss, victims)
        assert list(d) == list(ref)


@pytest.mark.parametrize("policy", ["lru", "fifo", "lfu", "arc", "s3fifo", "belady", "distance",
                                    "dsa_aware"])
def test_hbm_hits_equal_the_single_tier_simulator(policy):
    """Only an HBM tier, nothing released: every registered eviction policy (context-aware
    ones through ``begin_record``) gives the hits of ``kvtier.sim.cachesim.simulate``."""
    from kvtier.policies.registry import load_policy
    from kvtier.sim.cachesim import simulate

    s = _stream(requests=3, steps=10)
    bs = rebucket(s, BS)
    cap = 60
    ref = simulate(load_policy(policy)(cap), bs).hits
    b = TieredBackend(_config(cap), num_layers=3, eviction=policy, future_keys=bs.keys())
    assert _hbm_hits(b, drive_stream(b, s)) == ref


class _AlwaysCheckLost(TieredBackend):
    """The backend before the ``_lost_possible`` shortcut: HBM victims always looked up in
    every pool (the straightforward reference for that shortcut)."""

    @property
    def _lost_possible(self) -> bool:
        return True

    @_lost_possible.setter
    def _lost_possible(self, value: bool) -> None:
        pass


@settings(max_examples=40, deadline=None)
@given(data=_streams(), hbm=st.integers(0, 12), local=st.integers(0, 30),
       remote=st.integers(0, 30), release=st.sampled_from(["drop", "keep"]),
       pool_policy=st.sampled_from(["lru", "fifo"]))
def test_lost_block_shortcut_is_exact(data, hbm, local, remote, release, pool_policy):
    """Skipping the pool lookups of HBM victims while no block can lack a pool copy changes
    nothing: same records, summary and resident sets as checking every victim."""
    s, n_layers = data
    cfg_data = msgspec.to_builtins(_config(hbm, pools=True))
    cfg_data["local_pool"]["capacity_bytes"] = local * BLOCK
    cfg_data["remote_pool"]["capacity_bytes"] = remote * BLOCK
    cfg_data["remote_pool"]["nodes"] = 1
    cfg_data.update(on_release=release)
    cfg = config_from_dict(cfg_data)
    runs = []
    for cls in (TieredBackend, _AlwaysCheckLost):
        b = cls(cfg, num_layers=n_layers, pool_eviction=pool_policy)
        out = drive_stream(b, s)
        runs.append((_plain(out), b.summary(), {n: list(t.policy.keys()) for n, t in b.tiers.items()}))
    assert runs[0] == runs[1]


def test_lost_block_flag_set_by_drops_and_unserved():
    cfg_data = msgspec.to_builtins(_config(2, pools=True))
    cfg_data["local_pool"]["capacity_bytes"] = 100 * BLOCK
    cfg_data["remote_pool"]["capacity_bytes"] = 0
    b = TieredBackend(config_from_dict(cfg_data), num_layers=1)
    b.admit(0, 4 * BS)
    assert not b._lost_possible
    b.fetch(_access(0, 0, {0: [0, 1, 2]}))
    assert not b._lost_possible  # all served by the local pool
    cfg_data["local_pool"]["capacity_bytes"] = 2 * BLOCK  # the pool drops prompt blocks
    b = TieredBackend(config_from_dict(cfg_data), num_layers=1)
    b.admit(0, 4 * BS)
    assert b._lost_possible and sum(t.dropped for t in b.pools) == 2
