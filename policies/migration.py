"""Migration policies: background promote/demote between pool tiers between decode steps.

``promote_hot`` copies blocks read from the remote pool at least ``hot`` times (since the last
step boundary) up to the local pool, and moves local-pool blocks not read for ``cold_steps``
steps down to the remote pool, at most ``max_moves`` per boundary. The backend calls
``observe`` with the keys each pool tier served, so the policy sees pool reads only (HBM hits
never reach the pools).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from kvtier.policies.base import EvictionPolicy, MigrationPolicy


class NoMigration(MigrationPolicy):
    name = "none"

    def observe(self, step_idx: int, tier: str, keys: np.ndarray) -> None:
        pass

    def between_steps(self, step_idx: int, residency: dict[str, EvictionPolicy]
                      ) -> list[tuple[int, str, str]]:
        return []


class PromoteHotDemoteCold(MigrationPolicy):
    name = "promote_hot"

    def __init__(self, hot: int = 2, cold_steps: int = 8, max_moves: int = 4096) -> None:
        for field, v, lo in (("hot", hot, 1), ("cold_steps", cold_steps, 1), ("max_moves", max_moves, 0)):
            if int(v) < lo:
                raise ValueError(f"migration `{field}` must be >= {lo}, got {v}")
        self.hot, self.cold_steps, self.max_moves = int(hot), int(cold_steps), int(max_moves)
        self.remote_reads: Counter[int] = Counter()
        self.local_seen: dict[int, int] = {}

    def observe(self, step_idx: int, tier: str, keys: np.ndarray) -> None:
        if tier == "remote_pool":
            self.remote_reads.update(np.asarray(keys).tolist())
        elif tier == "local_pool":
            self.local_seen.update(dict.fromkeys(np.asarray(keys).tolist(), step_idx))

    def between_steps(self, step_idx: int, residency: dict[str, EvictionPolicy]
                      ) -> list[tuple[int, str, str]]:
        if "local_pool" not in residency or "remote_pool" not in residency:
            self.remote_reads.clear()
            return []
        local, remote = residency["local_pool"], residency["remote_pool"]
        moves: list[tuple[int, str, str]] = []
        for key, n in self.remote_reads.most_common():
            if n < self.hot or len(moves) >= self.max_moves:
                break
            if key in remote and key not in local:
                moves.append((key, "remote_pool", "local_pool"))
                self.local_seen[key] = step_idx
        self.remote_reads.clear()
        cutoff = step_idx - self.cold_steps
        cold = [k for k, s in self.local_seen.items() if s < cutoff]
        for key in cold:
            del self.local_seen[key]
            if len(moves) < self.max_moves and key in local:
                moves.append((key, "local_pool", "remote_pool"))
        return moves


POLICIES: dict[str, type[MigrationPolicy]] = {
    NoMigration.name: NoMigration,
    PromoteHotDemoteCold.name: PromoteHotDemoteCold,
}
