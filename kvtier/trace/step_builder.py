"""One decode step's records: points A and B for all layers x rows at once, sampling, point C,
then the record bytes.

The step arrives as a ``StepJob`` (its layers' top-k as ``LayerTopk``, copied by the tracer);
``StepBuilder.build`` runs on the tracer's caller or on its builder thread, never both at
once. The statistics are one 2-D problem over every (layer, active row), layer-major
(``kvtier.trace.step_numpy``, from the indices or, on the numba path, from row bitmaps);
sampling keeps or drops a request's records of the step, the same for every layer; the
backend answers point C for every row, sampled or not, so its state does not depend on the
sampling; the kept records go to ``NumbaRecords`` (no scores, numba installed) or
``NumpyRecords``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np

from kvtier.backend import HBMOnlyBackend, KVBackend, LayerAccess
from kvtier.schema import record_encoder
from kvtier.trace.host_copy import as_numpy
from kvtier.trace.prefix import PrefixState
from kvtier.trace.record_bytes import BatchRows, BufferPool, NumbaRecords, NumpyRecords
from kvtier.trace.record_lists import RecordLists
from kvtier.trace.settings import TraceSettings
from kvtier.trace.step_buffer import StepBuffer, check_topk
from kvtier.trace.step_numpy import StepStats, compute_step_stats, step_stats_from_bits
from kvtier.trace.summary import SummaryBuilder
from kvtier.trace.writer import TraceWriter


def sample_key(seed: int, request_id: int) -> int:
    """The request's key for ``sample_uniform`` under ``--trace-sample-seed``."""
    h = hashlib.blake2b(f"{seed}\x00{request_id}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")


def sample_uniform(keys: np.ndarray, step: int) -> np.ndarray:
    """Deterministic uniforms in [0, 1) per (request key, step): splitmix64 of key ^ step."""
    with np.errstate(over="ignore"):
        x = np.asarray(keys, dtype=np.uint64) ^ (np.uint64(step) * np.uint64(0x9E3779B97F4A7C15))
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass(slots=True)
class LayerTopk:
    """One ``on_topk`` call waiting for its step to be built. ``indices`` is None when the
    tracer already stored the layer in the step buffer (host arrays built in the caller);
    otherwise a host copy (a pinned tensor with ``event`` to wait on, or a numpy copy)."""

    layer_id: int
    indices: Any
    scores: Any
    event: Any


@dataclass(slots=True)
class StepJob:
    """One decode step to build: ``active[i]`` False leaves batch row i unrecorded; ``use_bits``
    chooses the step buffer's bitmaps; ``pinned`` is the set of pinned buffers its layers
    were copied into (returned by the tracer once built)."""

    step: int
    active: np.ndarray
    use_bits: bool
    layers: list[LayerTopk]
    wall_time_s: float | None
    pinned: dict | None = None


class StepBuilder:
    """Builds the records of one step of the current batch and writes them."""

    def __init__(self, settings: TraceSettings, backend: KVBackend, head: bytes,
                 summary: SummaryBuilder, writer: TraceWriter, kern: SimpleNamespace | None) -> None:
        """``head`` is ``record_layout.record_head`` of the run; ``kern`` the numba kernels, or
        None for the numpy path."""
        self.settings = settings
        self.backend = backend
        self.head = head
        self.enc = record_encoder()
        self.buffer = StepBuffer(kern)
        pool = BufferPool()
        bs = settings.kv_block_size
        self.numpy_records = NumpyRecords(bs, settings.store_scores, self.enc, pool, summary, writer)
        self.numba_records = None if kern is None else NumbaRecords(kern, bs, pool, summary, writer)
        self._stats_scratch: dict = {}
        self.set_batch([], [])

    def set_batch(self, request_ids: Sequence[int], prefix_states: Sequence[PrefixState]) -> None:
        """The batch the next steps belong to (empty between batches)."""
        self.request_ids = list(request_ids)
        self.rows = BatchRows.of(self.head, self.request_ids, prefix_states)
        self.sample_keys = np.array([sample_key(self.settings.sample_seed, r) for r in self.request_ids],
                                    dtype=np.uint64)

    def build(self, job: StepJob) -> None:
        """The records of one step: layers still to be stored first (CUDA: wait for the copy)."""
        layers = job.layers
        if not layers:
            return
        for slot, lay in enumerate(layers):
            if lay.indices is not None:
                if lay.event is not None:
                    lay.event.synchronize()
                arr = as_numpy(lay.indices)
                check_topk(lay.layer_id, arr, len(self.request_ids))
                self.buffer.store(slot, lay.layer_id, arr, job.step + 1, job.use_bits)
                if lay.event is not None and lay.scores is not None:
                    lay.scores = np.array(as_numpy(lay.scores), dtype=np.float64, copy=True)
        rows = np.flatnonzero(job.active)
        if len(rows) == 0:
            return
        self._finish(job, rows, self._stats(job, rows))

    def _stats(self, job: StepJob, rows: np.ndarray) -> StepStats:
        """Points A and B for every (layer, active row), layer-major."""
        layers = job.layers
        n_batch = len(self.request_ids)
        n_layers = len(layers)
        with_scores = [lay.scores is not None for lay in layers]
        if any(with_scores) and not all(with_scores):
            raise ValueError("scores must be given for every layer of a step or for none")
        all_rows = len(rows) == n_batch
        n_rows = len(rows)
        n_prefix = self.rows.n_prefix[np.tile(rows, n_layers)]  # of every (layer, row)
        bs = self.settings.kv_block_size
        if job.use_bits:
            assert self.buffer.bits is not None
            bits3 = self.buffer.bits[:n_layers]
            bits2 = (bits3 if all_rows else bits3[:, rows]).reshape(n_layers * n_rows, -1)
            return step_stats_from_bits(bits2, self.buffer.k, job.step + 1, bs, n_prefix,
                                        scratch=self._stats_scratch)
        assert self.buffer.indices is not None
        k = self.buffer.indices.shape[2]
        idx3 = self.buffer.indices[:n_layers]
        positions = idx3.reshape(-1, k) if all_rows else idx3[:, rows].reshape(-1, k)
        scores2 = None
        if with_scores[0]:
            for lay in layers:
                if lay.scores.shape != (n_batch, k):
                    raise ValueError(f"layer {lay.layer_id}: scores shape {list(lay.scores.shape)} "
                                     f"!= indices shape {[n_batch, k]}")
            sc3 = np.stack([lay.scores for lay in layers])
            scores2 = (sc3 if all_rows else sc3[:, rows]).reshape(-1, k)
        return compute_step_stats(positions, job.step + 1, bs, n_prefix, scores2,
                                  keep_scores=self.settings.store_scores, in_place=True,
                                  scratch=self._stats_scratch)

    def _finish(self, job: StepJob, rows: np.ndarray, stats: StepStats) -> None:
        """Sampling, point C (the backend) and the records of one step."""
        step = job.step
        n_rows = len(rows)
        layer_ids = [lay.layer_id for lay in job.layers]
        # sampling: per (request, step), identical for every layer
        if self.settings.sample_rate < 1.0:
            keep_row = sample_uniform(self.sample_keys[rows], step) < self.settings.sample_rate
        else:
            keep_row = np.ones(n_rows, dtype=bool)
        wall_us = None if job.wall_time_s is None else float(job.wall_time_s) * 1e6
        ids = [self.request_ids[r] for r in rows]
        keep = np.tile(keep_row, len(layer_ids))
        sel = np.flatnonzero(keep)
        whole = len(sel) == len(keep)
        if type(self.backend) is HBMOnlyBackend:
            # the plain HBM-only backend is stateless and its answer a closed form of the
            # row's blocks: the records' kv_fetch columns are computed directly (what
            # HBMOnlyBackend.fetch returns, byte for byte: tests/test_tracer_fast.py), not
            # one KVFetch object per record (a third of the numba path's per-record time)
            if not len(sel):
                return
            sub = stats if whole else stats.subset(sel)
            lists = RecordLists.hbm_only(sub, self.settings.kv_block_size * self.backend.kv_bytes_per_token,
                                         wall_us, self.enc)
        else:
            fetches, views = self._fetch(step, layer_ids, ids, stats, wall_us)
            for rid in ids:
                self.backend.append(rid, 1)
            if not len(sel):
                return
            sub = stats if whole else stats.subset(sel)
            sel_list = None if whole else sel.tolist()
            lists = RecordLists(sub, fetches if whole else [fetches[i] for i in sel_list],
                                views if whole else [views[i] for i in sel_list], self.backend.name,
                                self.enc)
        fast = self.numba_records is not None and stats.scores_min is None
        records = self.numba_records if fast else self.numpy_records
        records.write(step, layer_ids, rows, ids, sub, sel, lists, self.rows)

    def _fetch(self, step: int, layer_ids: list[int], ids: list[int], stats: StepStats,
               wall_us: float | None) -> tuple[list, list]:
        """Point C: one ``backend.fetch`` per layer over the active rows. Returns every
        record's ``KVFetch`` and the block-id array it was given (layer-major)."""
        n_rows = len(ids)
        fetches = []
        pstarts = stats.row_starts.tolist()
        bstarts = stats.block_starts.tolist()
        # every row's views at once (slices built and applied in C, not a Python loop)
        tp_all = list(map(stats.positions.__getitem__, map(slice, pstarts[:-1], pstarts[1:])))
        bl_all = list(map(stats.block_ids.__getitem__, map(slice, bstarts[:-1], bstarts[1:])))
        for li, layer_id in enumerate(layer_ids):
            r0 = li * n_rows
            access = LayerAccess(step_idx=step, layer_id=layer_id, request_ids=ids,
                                 token_pos=tp_all[r0:r0 + n_rows], block_ids=bl_all[r0:r0 + n_rows],
                                 block_size=self.settings.kv_block_size, step_wall_us=wall_us)
            got = self.backend.fetch(access)
            if len(got) != n_rows:
                raise ValueError(f"backend {self.backend.name!r} returned {len(got)} results for {n_rows} rows")
            fetches.extend(got)
        return fetches, bl_all
