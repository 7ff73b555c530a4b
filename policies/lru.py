"""LRU: evict the least recently read block. The reference point every sweep reports."""

from __future__ import annotations

from kvtier.policies.odict import OrderedDictPolicy


class LRUPolicy(OrderedDictPolicy):
    """Least recently used, on a C-implemented ``OrderedDict`` (O(1) move/evict)."""

    name = "lru"
    refresh = True
