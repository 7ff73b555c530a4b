"""The simulation wing: what a trace's selections would cost in other memory systems.

``access`` (a trace as numpy access columns), ``synth`` (synthetic DSA-like streams),
``cachesim`` (single-tier caches and LRU miss-ratio curves), ``sweep`` (policy x capacity x
block-size grids), ``replay`` (a trace through any ``KVBackend``) and ``tiers`` (the simpy
emulator of HBM + pools, its configs and presets). Imports ``kvtier.trace`` and below, never
``kvtier.analysis`` or the commands; no torch.
"""
