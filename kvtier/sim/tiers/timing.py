"""Virtual time: the simpy links every transfer queues on, and the stall it leaves.

Each link is a simpy ``Resource`` with ``channels`` slots (two, read and write, when
``duplex``); every tier, write, prefetch and migration on a link shares it, so concurrent
transfers on one link serialise. A (step, layer) issues at most one read batch per tier
(``read``), timed by ``kvtier.sim.tiers.cost``; the demand batch on HBM may first wait for
in-flight prefetches. Writes and migration moves are queued and issued, in the background,
at the next fetch (``flush``). The stall of a (step, layer) is its slowest pool batch.
"""

from __future__ import annotations

from collections.abc import Mapping

import simpy

from kvtier.sim.tiers.config import LinkSpec
from kvtier.sim.tiers.cost import batch_time_us
from kvtier.sim.tiers.tier import Tier, percentiles


class LinkClock:
    """The simpy environment, the links by name, queued background transfers and stall."""

    def __init__(self, links: Mapping[str, LinkSpec]) -> None:
        self.env = simpy.Environment()
        #: link name -> (read Resource, write Resource), the same Resource unless duplex
        self.links: dict[str, tuple[simpy.Resource, simpy.Resource]] = {}
        for lname, ls in links.items():
            r = simpy.Resource(self.env, capacity=ls.channels)
            self.links[lname] = (r, simpy.Resource(self.env, capacity=ls.channels) if ls.duplex else r)
        self._writes: dict[Tier, list[int]] = {}  # tier -> [bytes, ops] waiting to be issued
        self._moves: dict[tuple[Tier, bool], list[int]] = {}  # (tier, is read) -> [bytes, ops]
        self.stall_total = 0.0
        self.stalls: list[float] = []
        self.stall_step: dict[int, float] = {}
        self.stall_layer: dict[int, float] = {}

    @property
    def now(self) -> float:
        return self.env.now

    def queue_write(self, tier: Tier, nbytes: int, ops: int) -> None:
        """A write to ``tier``, issued (merged with the others to that tier) by ``flush``."""
        w = self._writes.setdefault(tier, [0, 0])
        w[0] += nbytes
        w[1] += ops

    def queue_move(self, tier: Tier, is_read: bool, nbytes: int) -> None:
        """One block of a migration: read on the source's link or written on the destination's."""
        m = self._moves.setdefault((tier, is_read), [0, 0])
        m[0] += nbytes
        m[1] += 1

    def flush(self) -> None:
        """Issue the queued writes (counted in the tiers' ``write_bytes`` / ``write_ops``) and
        moves as background transfers."""
        for t, (nbytes, ops) in self._writes.items():
            t.write_bytes += nbytes
            t.write_ops += ops
            dur = float(batch_time_us(t.spec, ops, nbytes, read=False))
            self.background(t.write, dur)
        self._writes.clear()
        for (t, is_read), (nbytes, ops) in self._moves.items():
            dur = float(batch_time_us(t.spec, ops, nbytes, read=is_read))
            self.background(t.read if is_read else t.write, dur)
        self._moves.clear()

    def background(self, res: simpy.Resource, duration: float) -> simpy.Process:
        """A transfer of ``duration`` µs on ``res`` that nobody waits for (prefetches: a
        demand read of the block may)."""
        return self.env.process(self._hold(res, duration))

    def _hold(self, res: simpy.Resource, duration: float):
        with res.request() as req:
            yield req
            yield self.env.timeout(duration)

    def _transfer(self, res: simpy.Resource, duration: float, waits: list, done: dict, tag: str):
        if waits:
            yield simpy.AllOf(self.env, waits)
        with res.request() as req:
            yield req
            yield self.env.timeout(duration)
        done[tag] = self.env.now

    def read(self, batches: list[tuple[Tier, float, list]]) -> dict[str, float]:
        """Run one (step, layer)'s read batches ``(tier, duration, events to wait for
        first)`` concurrently; returns each tier's latency (issue to end, queueing included),
        in order of completion."""
        env = self.env
        t0 = env.now
        done: dict[str, float] = {}
        procs = [env.process(self._transfer(t.read, dur, waits, done, t.name))
                 for t, dur, waits in batches]
        if procs:
            env.run(until=simpy.AllOf(env, procs))
        return {n: done[n] - t0 for n in done}

    def advance(self, us: float) -> None:
        """Let ``us`` of compute pass (background transfers progress meanwhile)."""
        self.env.run(until=self.env.now + us)

    def finish(self) -> None:
        """Issue what is queued and let every background transfer complete."""
        self.flush()
        self.env.run()

    def add_stall(self, step: int, layer: int, stall: float) -> None:
        """What attention waited at (step, layer) for KV that was not in HBM (µs)."""
        self.stall_total += stall
        self.stalls.append(stall)
        self.stall_step[step] = self.stall_step.get(step, 0.0) + stall
        self.stall_layer[layer] = self.stall_layer.get(layer, 0.0) + stall

    def stall_summary(self) -> dict:
        """The ``stall`` section of summary.json."""
        return {
            "total_us": self.stall_total,
            "per_fetch_us": percentiles(self.stalls),
            "per_step_us": {str(k): v for k, v in sorted(self.stall_step.items())},
            "per_layer_us": {str(k): v for k, v in sorted(self.stall_layer.items())},
        }
