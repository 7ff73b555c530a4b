"""FIFO: evict the block resident longest; hits do not refresh. The cheapest baseline."""

from __future__ import annotations

from kvtier.policies.odict import OrderedDictPolicy


class FIFOPolicy(OrderedDictPolicy):
    """First in, first out (insertion order in an ``OrderedDict``)."""

    name = "fifo"
    refresh = False
