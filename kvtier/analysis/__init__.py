"""The analysis wing: locality metrics, reports and plots computed from traces.

Sits above ``kvtier.sim`` and ``kvtier.trace`` (it may use both); the commands sit above it.
"""
