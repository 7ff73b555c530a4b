"""Pluggable policies for tiered KV stores (``kvtier.policies``).

Interfaces live in ``base``; eviction policies one per module (``lru``, ``fifo``, ``lfu``,
``arc``, ``s3fifo``, ``belady``, ``distance``, ``dsa_aware``); ``registry.load_policy`` finds
any of them, a user's ``module:Class`` or an entry point. Importing this package stays cheap
(no policy module is imported until asked for).
"""

from kvtier.policies.base import (
    AccessContext,
    EvictionPolicy,
    MigrationPolicy,
    PlacementPolicy,
    PrefetchPolicy,
    block_key,
    block_keys,
    block_keys_columns,
    split_key,
)
from kvtier.policies.registry import known_policies, load_policy, make_policy

__all__ = [
    "AccessContext",
    "EvictionPolicy",
    "MigrationPolicy",
    "PlacementPolicy",
    "PrefetchPolicy",
    "block_key",
    "block_keys",
    "block_keys_columns",
    "known_policies",
    "load_policy",
    "make_policy",
    "split_key",
]
