"""Tiered KV pools: tier configuration, the simpy emulator (``TieredBackend``) and the
fetch-versus-recompute model. Nothing here imports torch."""
