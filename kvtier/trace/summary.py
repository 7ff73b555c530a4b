"""``summary.json``: distributions over the records of a trace.

One ``SummaryBuilder`` serves both the live tracer (fed a whole decode step of arrays at a
time) and ``kvtier summarize`` (fed records read back from disk), so the two give identical
summaries. Integer samples (unique blocks, tokens per block, offsets) are kept as exact
histograms, so memory does not grow with the number of records; the float sample (prefix
intersection ratio) is kept whole.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from kvtier.schema import HotBlock, Summary, TopkRecord
from kvtier.trace.percentiles import add_hist, distribution, hist_distribution

#: optional sections a backend's ``summary()`` may return (anything else goes under ``tiers``)
BACKEND_SECTIONS = ("tiers", "stall", "fetch_vs_recompute")


class SummaryBuilder:
    """Accumulates the recomputable part of ``summary.json``."""

    def __init__(self, run_name: str, dataset: str, config: dict) -> None:
        self.run_name = run_name
        self.dataset = dataset
        self.config = config
        self.records = 0
        self._unique = np.zeros(0, np.int64)
        self._tpb = np.zeros(0, np.int64)
        self._offsets = np.zeros(0, np.int64)
        self._ratios: list[np.ndarray] = []
        self._hot: dict[int, np.ndarray] = {}

    def add(self, request_ids: Sequence[int], unique_blocks: np.ndarray, block_counts: np.ndarray,
            offsets: np.ndarray | None, ratios: np.ndarray, prefix_rows: np.ndarray | None,
            prefix_blocks: np.ndarray | None, offset_hist: np.ndarray | None = None,
            tpb_hist: np.ndarray | None = None,
            hot_counts: tuple[Sequence[int], np.ndarray] | None = None) -> None:
        """Add records, one per entry of ``request_ids``.

        ``block_counts``: selected tokens of every touched block of these records (flat), or
        their histogram as ``tpb_hist`` (then ``block_counts`` may be None);
        ``offsets``: every unique offset (flat), or their histogram as ``offset_hist``;
        ``prefix_rows``/``prefix_blocks``: one entry
        per touched prefix block, the record's index into ``request_ids`` and the block id; or
        already counted as ``hot_counts`` = (request ids, touches[request, block id]).
        The histogram forms are what the tracer's numba path computes on the way.
        """
        n = len(request_ids)
        if n == 0:
            return
        self.records += n
        self._unique = add_hist(self._unique, np.bincount(unique_blocks))
        self._tpb = add_hist(self._tpb, np.bincount(block_counts) if tpb_hist is None else tpb_hist)
        if offset_hist is None:
            offset_hist = np.bincount(offsets)
        self._offsets = add_hist(self._offsets, offset_hist)
        self._ratios.append(np.asarray(ratios, dtype=np.float64))
        for rid in dict.fromkeys(request_ids):
            self._hot.setdefault(rid, np.zeros(0, np.int64))
        if hot_counts is not None:
            rids, counts = hot_counts
            for i in np.flatnonzero(counts.any(axis=1)):
                self._hot[rids[i]] = add_hist(self._hot[rids[i]], counts[i])
        elif prefix_rows is not None and prefix_blocks is not None and len(prefix_rows):
            width = int(prefix_blocks.max()) + 1
            req_codes, req_index = np.unique(np.asarray(request_ids, dtype=np.int64), return_inverse=True)
            keys = req_index[prefix_rows] * width + prefix_blocks
            counts = np.bincount(keys, minlength=len(req_codes) * width).reshape(len(req_codes), width)
            for i in np.flatnonzero(counts.any(axis=1)):
                rid = int(req_codes[i])
                self._hot[rid] = add_hist(self._hot[rid], counts[i])

    def add_records(self, records: Iterable[TopkRecord]) -> None:
        """Add decoded records (the offline path of ``kvtier summarize``)."""
        ids: list[int] = []
        unique: list[int] = []
        ratios: list[float] = []
        counts: list[np.ndarray] = []
        offsets: list[np.ndarray] = []
        prow: list[np.ndarray] = []
        pblk: list[np.ndarray] = []
        for i, rec in enumerate(records):
            ids.append(rec.request_id)
            unique.append(rec.unique_blocks)
            ratios.append(rec.prefix.intersection_ratio)
            pos = np.asarray(rec.selected_token_pos, dtype=np.int64)
            offsets.append(rec.seq_len_current - 1 - pos)
            blocks = pos // rec.block_size_tokens
            edges = np.flatnonzero(np.diff(blocks)) + 1
            counts.append(np.diff(np.concatenate(([0], edges, [len(blocks)]))))
            inter = rec.prefix.intersection_blocks
            prow.append(np.full(len(inter), i, dtype=np.int64))
            pblk.append(np.asarray(inter, dtype=np.int64))
        if not ids:
            return
        self.add(ids, np.asarray(unique, dtype=np.int64), np.concatenate(counts),
                 np.concatenate(offsets), np.asarray(ratios, dtype=np.float64),
                 np.concatenate(prow), np.concatenate(pblk))

    def hot_blocks(self) -> dict[str, list[HotBlock]]:
        """Per request (keyed by its id as a JSON object key, in id order): its touched prefix
        blocks as ``{block_id, touch_count}`` (records touching it), most touched first."""
        out: dict[str, list[HotBlock]] = {}
        for rid in sorted(self._hot):
            counts = self._hot[rid]
            blocks = np.flatnonzero(counts)
            order = np.lexsort((blocks, -counts[blocks]))
            out[str(rid)] = [HotBlock(block_id=int(b), touch_count=int(counts[b]))
                             for b in blocks[order]]
        return out

    def build(self, **sections: object) -> Summary:
        """The summary; ``sections`` fill the optional fields (serving, skipped, tiers, ...)."""
        ratios = np.concatenate(self._ratios) if self._ratios else np.zeros(0)
        return Summary(
            run_name=self.run_name,
            dataset=self.dataset,
            config=self.config,
            records=self.records,
            requests=len(self._hot),
            unique_blocks=hist_distribution(self._unique),
            tokens_per_touched_block=hist_distribution(self._tpb),
            offsets=hist_distribution(self._offsets),
            prefix_intersection_ratio=distribution(ratios),
            prefix_hot_blocks=self.hot_blocks(),
            **{k: v for k, v in sections.items() if v is not None},
        )


def backend_sections(backend_summary: dict | None) -> dict:
    """Map a backend's ``summary()`` onto the optional sections of ``summary.json``."""
    if not backend_summary:
        return {}
    if set(backend_summary) <= set(BACKEND_SECTIONS):
        return dict(backend_summary)
    return {"tiers": backend_summary}


def recompute_summary(trace_dir, keep_from: Summary | None = None, batch: int = 512,
                      skipped=None) -> Summary:
    """The summary of a trace directory from its records and ``trace_meta.json`` alone.
    Optional sections (serving, skipped, tiers, ...) are copied from ``keep_from``. Strict
    without ``skipped``; with a ``kvtier.trace.reader.SkippedLines`` the lines that are not
    records (a killed run's half line) are skipped and counted there."""
    from kvtier.trace.reader import find_trace, iter_records

    tf = find_trace(trace_dir, require_meta=True)
    assert tf.meta is not None
    builder = SummaryBuilder(tf.meta.run_name, tf.meta.dataset, tf.meta.config)
    chunk: list[TopkRecord] = []
    for rec in iter_records(tf, skipped=skipped):
        chunk.append(rec)
        if len(chunk) >= batch:
            builder.add_records(chunk)
            chunk = []
    builder.add_records(chunk)
    sections = {}
    if keep_from is not None:
        sections = {name: getattr(keep_from, name) for name in ("serving", "skipped", *BACKEND_SECTIONS)}
    return builder.build(**sections)
