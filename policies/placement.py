"""Placement policies: which pool tier(s) a block is written to, and where a pool's victims go.

Modelled on Mooncake's allocation strategies (kv_tiers.md §1): ``local_first`` fills the
nearest pool with room, ``free_ratio_first`` the pool with the largest free fraction.
``replicas`` > 1 writes copies to that many distinct pool tiers (nearest first after the
primary). A pool's eviction victim is demoted to the next pool down, or dropped with
``demote=False``.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvtier.policies.base import PlacementPolicy


class LocalFirst(PlacementPolicy):
    """The nearest pool tier that has free blocks; if none has, the nearest (it evicts)."""

    name = "local_first"

    def __init__(self, replicas: int = 1, demote: bool = True) -> None:
        if int(replicas) < 1:
            raise ValueError(f"placement `replicas` must be >= 1, got {replicas}")
        self.replicas = int(replicas)
        self.demote = bool(demote)
        self.capacities: dict[str, int] = {}

    def bind(self, capacities: dict[str, int]) -> None:
        """The backend announces each pool tier's capacity in blocks before the first call."""
        self.capacities = dict(capacities)

    def _order(self, tiers: Sequence[str], free_blocks: dict[str, int]) -> list[str]:
        with_room = [t for t in tiers if free_blocks.get(t, 0) > 0]
        return with_room + [t for t in tiers if t not in with_room]

    def place(self, key: int, tiers: Sequence[str], free_blocks: dict[str, int]) -> list[str]:
        return self._order(tiers, free_blocks)[: self.replicas]

    def place_many(self, n: int, tiers: Sequence[str], free_blocks: dict[str, int]
                   ) -> list[list[str]] | None:
        """``place`` for ``n`` new blocks in a row, or None where only per-block calls are
        exact. For one replica, local_first fills the nearest tier with room, then the next;
        with no room anywhere every block goes to the nearest (which evicts)."""
        if type(self) is not LocalFirst or self.replicas != 1:
            return None
        out: list[list[str]] = []
        for t in tiers:
            room = max(free_blocks.get(t, 0), 0)
            out.extend([[t]] * min(room, n - len(out)))
        out.extend([[tiers[0]]] * (n - len(out)) if tiers else [])
        return out

    def demote_target(self, tier: str, tiers: Sequence[str]) -> str | None:
        """Where a victim of ``tier`` goes: the next pool down, or None (dropped)."""
        if not self.demote or tier not in tiers:
            return None
        i = list(tiers).index(tier)
        return tiers[i + 1] if i + 1 < len(tiers) else None


class FreeRatioFirst(LocalFirst):
    """The pool tier with the largest free fraction (ties go to the nearer tier)."""

    name = "free_ratio_first"

    def _order(self, tiers: Sequence[str], free_blocks: dict[str, int]) -> list[str]:
        def ratio(t: str) -> float:
            cap = self.capacities.get(t, 0)
            return free_blocks.get(t, 0) / cap if cap > 0 else -1.0

        return sorted(tiers, key=lambda t: -ratio(t))  # stable: nearer first on ties


POLICIES: dict[str, type[PlacementPolicy]] = {
    LocalFirst.name: LocalFirst,
    FreeRatioFirst.name: FreeRatioFirst,
}
