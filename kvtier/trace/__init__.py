"""The trace wing: the ``dsa_topk`` record's recording and its files.

``tracer`` (points A-D per decode step: the call sequence, delegating to ``host_copy``,
``step_buffer``, ``background_builder`` and ``step_builder``; the statistics in ``step_numpy``,
the record bytes in ``record_layout``, ``record_lists``, ``record_bytes`` and ``intlist_json``,
the optional numba kernels in ``step_numba``), ``writer`` / ``reader`` (JSONL shards),
``parquet`` and ``convert`` (the compact form), ``validate``, ``summary`` (with
``percentiles``), ``prefix`` (point D's chained prefix hashes), ``settings`` (the trace flags)
and ``sanity`` (a synthetic trace without torch). Imports only ``kvtier.schema`` and
``kvtier.backend`` from outside the wing.
"""
