"""Tiered KV pools: tier configuration, the simpy emulator (``TieredBackend``) and the
fetch-versus-recompute model. Nothing here imports torch.

``backend`` (``TieredBackend``, composing:) ``tier`` (one tier's resident set and counters),
``hbm_cache`` (HBM under demand reads), ``backing_store`` (the pools: placement, demotion,
misses served, migration), ``prefetcher``, ``timing`` (simpy links and stall), with
``fast_path`` (the LRU/FIFO dict fast path) and ``cost`` (the batch cost formula);
``keyspace`` (request ids to block keys), ``recompute``, ``config`` / ``specs`` / ``presets``.
"""
