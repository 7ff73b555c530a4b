"""Point D: chained prefix block hashes and cache-hit accounting."""

from __future__ import annotations

import subprocess
import sys

from kvtier.trace.prefix import PrefixAnalyzer, chained_block_hashes, prefix_key


def test_full_blocks_only_within_key_tokens():
    toks = list(range(100))
    assert len(chained_block_hashes(toks, 16, 256)) == 6  # 100 // 16
    assert len(chained_block_hashes(toks, 16, 40)) == 2  # first 40 tokens: 2 full blocks
    assert chained_block_hashes(toks[:15], 16, 256) == []
    assert prefix_key([]) is None


def test_hashes_are_chained():
    a = chained_block_hashes([1] * 16 + [2] * 16, 16, 256)
    b = chained_block_hashes([3] * 16 + [2] * 16, 16, 256)
    assert a[1] != b[1]  # same block content, different parent
    assert chained_block_hashes([1] * 16 + [2] * 16 + [9], 16, 256) == a
    assert prefix_key(a) == f"{a[-1]:016x}" and len(prefix_key(a)) == 16


def test_hashes_are_stable_across_processes():
    code = "from kvtier.trace.prefix import chained_block_hashes as h; print(h(list(range(32)), 16, 256))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    assert len(outs) == 1
    assert outs.pop().strip() == str(chained_block_hashes(list(range(32)), 16, 256))


def test_cached_blocks_count_shared_leading_blocks():
    pa = PrefixAnalyzer(block_size=4, max_tokens=16)
    system = [7, 7, 7, 7, 8, 8, 8, 8]
    first = pa.admit(system + [1, 2, 3, 4, 5, 6, 7, 8])
    assert (first.cached_blocks, first.cache_hit, first.n_prefix_blocks) == (0, False, 4)
    second = pa.admit(system + [9, 9, 9, 9, 5, 6, 7, 8])
    assert (second.cached_blocks, second.cache_hit) == (2, True)
    same = pa.admit(system + [1, 2, 3, 4, 5, 6, 7, 8, 99])
    assert same.cached_blocks == 4 and same.key == first.key
    other = pa.admit([0, 7, 7, 7] + system[4:])
    assert other.cached_blocks == 0 and not other.cache_hit
