"""Read amplification per block size 1 ... 512 and the sub-block what-if.

For a record that selected K tokens, fetching whole blocks of B tokens reads U_B blocks, i.e.
U_B B tokens: read amplification = sum U_B B / sum K over the records (bytes fetched at block
granularity / bytes of the selected tokens; the bytes per token cancel). U_B at every power of
two comes from one pass over the sorted positions (``kernels.token_pass``).

Sub-block what-if: blocks of B tokens stay the unit of placement and residency, but each is
split into s sub-blocks of B/s tokens and only the touched sub-blocks are fetched, one read op
per sub-block (a whole-block fetch is one op per block). Bytes then equal those of B/s-token
blocks while ops grow from U_B to U_{B/s}; the unloaded time of one record's fetch on each pool
of the tier preset (``kvtier.sim.tiers.cost.batch_time_us``: base + ops x per-op + bytes / bw)
prices the trade.
"""

from __future__ import annotations

import numpy as np

from kvtier.analysis.kernels import AMP_LEVELS
from kvtier.analysis.stats import DistSet

SIZES = [1 << lv for lv in range(AMP_LEVELS)]
SIZE_ARR = np.array(SIZES, dtype=np.int64)
WHATIF_BLOCKS = [16, 32, 64, 128, 256, 512]
POOLS = ("local_pool", "remote_pool")


class ReadAmplification:
    def __init__(self, tier_config, kv_bytes_per_token: int) -> None:
        self.cfg = tier_config
        self.kvb = int(kv_bytes_per_token)
        self.blocks = np.zeros(AMP_LEVELS, dtype=np.int64)
        self.tokens = 0
        self.records = 0
        self.per_record = DistSet(AMP_LEVELS)
        self.pools = [p for p in POOLS if getattr(tier_config, p, None) is not None]
        # per fetch granularity 2**l tokens: summed per-record fetch time on each pool
        self.time_sum = {p: np.zeros(AMP_LEVELS) for p in self.pools}

    def add(self, amp: np.ndarray, k: np.ndarray) -> None:
        """``amp[i, l]`` = distinct 2**l-token blocks of record i; ``k[i]`` = its tokens."""
        from kvtier.sim.tiers.cost import batch_time_us, read_ops

        self.blocks += amp.sum(axis=0)
        self.tokens += int(k.sum())
        self.records += int(k.shape[0])
        self.per_record.add(amp * SIZE_ARR / k.astype(np.float64)[:, None])
        seg = SIZE_ARR * self.kvb  # bytes of one 2**l-token segment, per level
        for p in self.pools:  # per-record fetch time at every granularity, one call per pool
            tier = getattr(self.cfg, p)
            self.time_sum[p] += batch_time_us(tier, read_ops(tier, amp, seg), amp * seg).sum(0)

    def result(self) -> dict:
        tok = self.tokens
        rows = []
        for lv, size in enumerate(SIZES):
            u = int(self.blocks[lv])
            rows.append({"block_size_tokens": size, "ratio": u * size / tok if tok else 0.0,
                         "blocks_per_record": u / self.records if self.records else 0.0,
                         "per_record": self.per_record.dist(lv)})
        whatif = []
        for big in WHATIF_BLOCKS:
            lb = big.bit_length() - 1
            whole = self.blocks[lb] / self.records if self.records else 0.0
            for ls in range(lb, -1, -1):
                sub = 1 << ls
                ops = self.blocks[ls] / self.records if self.records else 0.0
                row = {"block_size_tokens": big, "sub_blocks": big // sub,
                       "sub_block_tokens": sub,
                       "read_amplification": int(self.blocks[ls]) * sub / tok if tok else 0.0,
                       "bytes_per_record": ops * sub * self.kvb,
                       "ops_per_record": ops, "extra_ops_per_record": ops - whole}
                for p in self.pools:
                    row[f"{p}_fetch_us_per_record"] = (float(self.time_sum[p][ls])
                                                       / self.records if self.records else 0.0)
                whatif.append(row)
        return {"kv_bytes_per_token": self.kvb, "tiers": getattr(self.cfg, "name", None),
                "records": self.records, "selected_tokens": tok, "by_block_size": rows,
                "subblock_whatif": whatif}
