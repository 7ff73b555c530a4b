"""Eviction policies against straightforward reference implementations, plus properties."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
from cache_refs import ref_fifo, ref_lru, ref_opt
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.policies import EvictionPolicy, block_key, known_policies, load_policy, split_key
from kvtier.policies.belady import next_occurrence
from kvtier.policies.registry import PolicyNotFound
from kvtier.sim.access import rebucket
from kvtier.sim.cachesim import simulate
from kvtier.sim.synth import SynthConfig, synth_stream

ALL = ["lru", "fifo", "lfu", "arc", "s3fifo", "belady", "belady_bypass", "distance", "dsa_aware"]




def ref_lfu(keys: list[int], cap: int) -> int:
    count: dict[int, int] = {}
    last: dict[int, int] = {}
    hits = 0
    for i, k in enumerate(keys):
        if k in count:
            hits += 1
            count[k] += 1
        elif cap:
            if len(count) == cap:
                victim = min(count, key=lambda x: (count[x], last[x]))
                del count[victim], last[victim]
            count[k] = 1
        if k in count:
            last[k] = i
    return hits


def ref_arc(keys: list[int], c: int) -> int:
    """ARC as printed in Megiddo & Modha (FAST'03, Fig. 4), on plain lists (LRU end first)."""
    t1: list[int] = []
    t2: list[int] = []
    b1: list[int] = []
    b2: list[int] = []
    p = 0.0
    hits = 0

    def replace(x: int) -> None:
        if t1 and (len(t1) > p or (x in b2 and len(t1) == p)):
            b1.append(t1.pop(0))
        else:
            b2.append(t2.pop(0))

    for x in keys:
        if c == 0:
            continue
        if x in t1 or x in t2:
            hits += 1
            (t1 if x in t1 else t2).remove(x)
            t2.append(x)
        elif x in b1:
            p = min(c, p + max(len(b2) / len(b1), 1))
            replace(x)
            b1.remove(x)
            t2.append(x)
        elif x in b2:
            p = max(0, p - max(len(b1) / len(b2), 1))
            replace(x)
            b2.remove(x)
            t2.append(x)
        else:
            if len(t1) + len(b1) == c:
                if len(t1) < c:
                    b1.pop(0)
                    replace(x)
                else:
                    t1.pop(0)
            elif len(t1) + len(t2) + len(b1) + len(b2) >= c:
                if len(t1) + len(t2) + len(b1) + len(b2) == 2 * c:
                    b2.pop(0)
                replace(x)
            t1.append(x)
    return hits


def ref_distance(bs, cap: int) -> int:
    """Evict the resident block farthest behind its request's latest position (ties: lowest
    key), found by scanning every resident block."""
    s = bs.stream
    keys = bs.keys().tolist()
    cur: dict[int, int] = {}
    res: set[int] = set()
    hits = 0
    for i in range(len(s)):
        r = int(s.req[i])
        cur[r] = max(cur.get(r, 0), int(s.seq_len[i]))
        for k in keys[bs.offsets[i]:bs.offsets[i + 1]]:
            if k in res:
                hits += 1
                continue
            if cap == 0:
                continue
            if len(res) == cap:
                res.remove(max(res, key=lambda x: (
                    cur.get(split_key(x)[0], 0) - (split_key(x)[2] + 1) * bs.block_size, -x)))
            res.add(k)
    return hits


def make(name: str, cap: int) -> EvictionPolicy:
    return load_policy(name)(cap)


def run_keys(name: str, keys: np.ndarray, cap: int) -> int:
    p = make(name, cap)
    if p.offline:
        p.set_future(keys)
    return p.access_many(keys)


key_lists = st.lists(st.integers(0, 12), min_size=0, max_size=120)


# --- exact agreement with references -----------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(keys=key_lists, cap=st.integers(0, 10))
def test_lru_fifo_lfu_match_reference(keys, cap):
    arr = np.array(keys, dtype=np.int64)
    assert run_keys("lru", arr, cap) == ref_lru(keys, cap)
    assert run_keys("fifo", arr, cap) == ref_fifo(keys, cap)
    assert run_keys("lfu", arr, cap) == ref_lfu(keys, cap)
    assert run_keys("arc", arr, cap) == ref_arc(keys, cap)


@settings(max_examples=150, deadline=None)
@given(keys=key_lists, cap=st.integers(0, 10))
def test_belady_matches_reference(keys, cap):
    arr = np.array(keys, dtype=np.int64)
    assert run_keys("belady", arr, cap) == ref_opt(keys, cap)
    assert run_keys("belady_bypass", arr, cap) == ref_opt(keys, cap, bypass=True)


def test_references_agree_on_realistic_stream():
    """The hand-checked references and the fast policies on a DSA-like key stream."""
    keys = rebucket(synth_stream(SynthConfig(requests=2, layers=2, steps=12, prompt_len=512,
                                             prompt_jitter=64, topk=64)), 16).keys()
    kl = keys.tolist()
    for cap in (8, 40, 120):
        assert run_keys("lru", keys, cap) == ref_lru(kl, cap)
        assert run_keys("fifo", keys, cap) == ref_fifo(kl, cap)
        assert run_keys("belady", keys, cap) == ref_opt(kl, cap)
        assert run_keys("arc", keys, cap) == ref_arc(kl, cap)
        # OPT bounds every online policy
        for name in ("lru", "fifo", "lfu", "arc", "s3fifo"):
            assert run_keys(name, keys, cap) <= run_keys("belady_bypass", keys, cap)


def test_next_occurrence():
    keys = np.array([5, 3, 5, 5, 3, 9])
    assert next_occurrence(keys).tolist() == [2, 4, 3, 6, 6, 6]


def test_belady_rejects_a_different_stream():
    p = make("belady", 2)
    p.set_future(np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="set_future"):
        p.access_many(np.array([1, 3, 2]))
    p = make("belady", 2)
    p.set_future(np.array([1, 2]))
    p.access(1)
    with pytest.raises(ValueError, match="set_future"):
        p.access(7)


# --- properties of every policy ----------------------------------------------------------------


def _stream_for(keys: list[int]):
    """A tiny AccessStream whose key stream is a function of ``keys`` (for context policies)."""
    from kvtier.sim.access import AccessStream

    n = len(keys)
    return AccessStream(
        request_ids=["a", "b"], req=np.array([k % 2 for k in keys], dtype=np.int64),
        layer=np.array([(k // 2) % 3 for k in keys], dtype=np.int64),
        step=np.arange(n, dtype=np.int64), seq_len=np.arange(n, dtype=np.int64) + 64,
        offsets=np.arange(n + 1, dtype=np.int64),
        pos=np.array([(k // 6) * 4 for k in keys], dtype=np.int64), block_size=4)


@settings(max_examples=100, deadline=None)
@given(keys=st.lists(st.integers(0, 60), max_size=150), cap=st.integers(0, 9))
def test_distance_matches_reference(keys, cap):
    bs = rebucket(_stream_for(keys), 4)
    assert simulate(make("distance", cap), bs).hits == ref_distance(bs, cap)


def test_distance_matches_reference_realistic():
    bs = rebucket(synth_stream(SynthConfig(requests=4, layers=2, steps=10, prompt_len=300,
                                           prompt_jitter=100, topk=48, stagger=2)), 16)
    for cap in (5, 30, 90):
        assert simulate(make("distance", cap), bs).hits == ref_distance(bs, cap)


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=40, deadline=None)
@given(keys=st.lists(st.integers(0, 40), max_size=150), cap=st.integers(0, 9))
def test_policy_properties(name, keys, cap):
    bs = rebucket(_stream_for(keys), 4)
    ks = bs.keys()
    # per-access path through the generic interface, checking invariants at every step
    p = make(name, cap)
    if p.offline:
        p.set_future(ks)
    s = bs.stream
    hits = 0
    for i in range(len(s)):
        p.begin_record(int(s.step[i]), int(s.layer[i]), int(s.req[i]), int(s.seq_len[i]), 4)
        for k in ks[bs.offsets[i]:bs.offsets[i + 1]].tolist():
            before = set(p.keys())
            if k in p:
                p.touch(k)
                hits += 1
                assert set(p.keys()) == before
            else:
                victims = p.insert(k)
                after = set(p.keys())
                assert all(v in before or v == k for v in victims)
                assert not (set(victims) & after)
                assert after == (before | {k}) - set(victims)
            assert len(p) <= cap
            assert len(p) == len(set(p.keys()))
    # the fast path and the simulator agree with it, and are deterministic
    r1 = simulate(make(name, cap), bs)
    r2 = simulate(make(name, cap), bs)
    assert r1.hits == r2.hits == hits
    assert r1.hits + r1.misses == r1.accesses == len(ks)


@pytest.mark.parametrize("name", [n for n in ALL if n not in ("belady", "belady_bypass")])
def test_remove_and_release(name):
    p = make(name, 8)
    for k in (block_key(0, 0, 1), block_key(1, 0, 1), block_key(0, 2, 5)):
        p.insert(k)
    assert p.remove(block_key(1, 0, 1)) is True
    assert p.remove(block_key(1, 0, 1)) is False
    assert block_key(1, 0, 1) not in p
    gone = p.release_request(0)
    assert sorted(gone) == sorted([block_key(0, 0, 1), block_key(0, 2, 5)])
    assert len(p) == 0


def test_capacity_validation():
    with pytest.raises(ValueError, match="capacity"):
        make("lru", -1)


def test_key_layout_roundtrip():
    k = block_key(12345, 61, 99999)
    assert split_key(k) == (12345, 61, 99999)


# --- registry -----------------------------------------------------------------------------------


def test_registry_builtins():
    names = known_policies()
    for n in ALL:
        assert n in names
        assert issubclass(load_policy(n), EvictionPolicy)


def test_registry_unknown_lists_known():
    with pytest.raises(PolicyNotFound) as err:
        load_policy("nope")
    msg = str(err.value)
    assert "nope" in msg and "lru" in msg and "s3fifo" in msg and "\n" not in msg


USER_POLICY = textwrap.dedent('''
    from kvtier.policies.lru import LRUPolicy

    class MRUish(LRUPolicy):
        name = "mruish"

    class NotAPolicy:
        pass
''')


def test_registry_module_path(tmp_path, monkeypatch):
    pkg = tmp_path / "mypkg_kvt"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mymod.py").write_text(USER_POLICY)
    monkeypatch.syspath_prepend(str(tmp_path))
    cls = load_policy("mypkg_kvt.mymod:MRUish")
    assert cls.name == "mruish" and cls(4).access_many([1, 2, 1]) == 1
    with pytest.raises(PolicyNotFound, match="has no 'Missing'"):
        load_policy("mypkg_kvt.mymod:Missing")
    with pytest.raises(PolicyNotFound, match="not a subclass"):
        load_policy("mypkg_kvt.mymod:NotAPolicy")
    with pytest.raises(PolicyNotFound, match="cannot import"):
        load_policy("no_such_pkg_kvt.mod:X")
    sys.modules.pop("mypkg_kvt.mymod", None)
    sys.modules.pop("mypkg_kvt", None)


def test_registry_file_path(tmp_path):
    f = tmp_path / "my_policy.py"
    f.write_text(USER_POLICY)
    cls = load_policy(f"{f}:MRUish")
    assert cls(2).access_many([1, 1]) == 1


def test_dsa_aware_protects_sink_and_window():
    p = make("dsa_aware", 3)
    # request 0 at position 1000, block size 16: block 0 is the sink, block 62 is in the window
    p.begin_record(0, 0, 0, 1000, 16)
    sink, window = block_key(0, 0, 0), block_key(0, 0, 62)
    p.access(sink)
    p.access(window)
    for b in range(10, 30):  # a burst of one-off blocks must not displace them
        p.access(block_key(0, 0, b))
    assert sink in p and window in p


def ref_clock(keys: list[int], cap: int) -> int:
    """Textbook CLOCK: a circular buffer of frames with reference bits and a hand."""
    frames: list[int | None] = [None] * cap
    ref = [False] * cap
    hand = 0
    hits = 0
    for k in keys:
        if k in frames:
            ref[frames.index(k)] = True
            hits += 1
            continue
        if cap == 0:
            continue
        while frames[hand] is not None and ref[hand]:
            ref[hand] = False
            hand = (hand + 1) % cap
        frames[hand], ref[hand] = k, False
        hand = (hand + 1) % cap
    return hits


def test_docs_worked_example(tmp_path):
    """The CLOCK class in docs/POLICIES.md §3 loads from a file and runs through kvtier sweep."""
    import csv
    import re
    from pathlib import Path

    from kvtier.cli import main

    doc = (Path(__file__).parents[1] / "docs" / "POLICIES.md").read_text()
    section = doc.split("## 3. Worked example", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    f = tmp_path / "my_clock.py"
    f.write_text(code)
    cls = load_policy(f"{f}:ClockPolicy")
    keys = rebucket(synth_stream(SynthConfig(requests=2, layers=2, steps=8, prompt_len=400,
                                             prompt_jitter=50, topk=64)), 16).keys()
    for cap in (0, 5, 40, 200):
        assert cls(cap).access_many(keys) == ref_clock(keys.tolist(), cap)
    trace = tmp_path / "trace"
    from kvtier.sim.synth import write_trace

    write_trace(synth_stream(SynthConfig(requests=2, layers=2, steps=6, prompt_len=300,
                                         prompt_jitter=20, topk=48)), trace)
    out = tmp_path / "t.csv"
    assert main(["sweep", str(trace), "--policies", f"lru,{f}:ClockPolicy", "--capacities",
                 "20blocks", "--out", str(out), "--no-progress"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert rows[1]["policy"].endswith("my_clock.py:ClockPolicy") and int(rows[1]["accesses"]) > 0


def test_registry_entry_point(monkeypatch):
    from kvtier.policies import registry

    class FakeEP:
        name = "my_ep_policy"

        def load(self):
            from kvtier.policies.fifo import FIFOPolicy

            return FIFOPolicy

    monkeypatch.setattr(registry, "entry_points", lambda group: [FakeEP()]
                        if group == registry.ENTRY_POINT_GROUP else [])
    assert "my_ep_policy" in known_policies()
    assert load_policy("my_ep_policy").name == "fifo"


def test_registry_other_kinds_and_bad_kind():
    with pytest.raises(ValueError, match="unknown policy kind"):
        load_policy("lru", kind="nonsense")
    with pytest.raises(PolicyNotFound, match="not a subclass of PlacementPolicy"):
        load_policy("kvtier.policies.lru:LRUPolicy", kind="placement")
