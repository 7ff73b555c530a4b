"""The analysis wing: locality metrics, reports and the notebook API, computed from traces.

- ``analyze``: ``analyze(trace, AnalysisSettings(...))`` -> the ``analysis.json`` dict, one
  streaming pass (``source`` reads chunks, ``chunk`` validates them, ``locality``,
  ``amplification``, ``shared``, ``prefix``, ``tiers`` and ``union`` compute the sections,
  ``kernels`` holds the hot loops in numpy and numba).
- ``report``: figures and the offline HTML page; ``api``: ``open_trace`` for notebooks.

Sits above ``kvtier.sim`` and ``kvtier.trace`` (it may use both); the commands sit above it.
docs/ANALYSIS.md defines every metric.
"""
