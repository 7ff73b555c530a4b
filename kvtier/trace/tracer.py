"""The tracer: turns the indexer's top-k of every decode step x layer into trace records.

The model calls ``begin_batch`` / ``start_step`` / ``on_topk`` (every layer) / ``end_step`` /
``end_batch`` / ``close``; ``Tracer`` is that call sequence, request numbering, point D's
prefix admission, ``requests.jsonl`` and ``summary.json``, and hands the rest to the pieces:

- ``host_copy``: ``on_topk`` only copies (on CUDA: non-blocking into pinned host buffers,
  plus an event), so the forward never waits for the tracer;
- ``step_buffer``: host top-k stored (and range-checked) into one buffer per step, or per-row
  bitmaps on the numba path;
- ``background_builder``: for CUDA top-k (the model on a GPU) ``end_step`` queues the step to
  a builder thread and returns at once, so records of step t are built while the GPU computes
  step t+1 (``build_in_background="always"``: host arrays too, copied in ``on_topk``;
  ``"never"``: every step in ``end_step``). The queue holds ``max_pending_steps``; when the
  builder falls behind, ``end_step`` waits for a free slot (back-pressure, never a dropped
  step), and the waits are counted in ``build_stats`` and reported by a warning at ``close``.
  Anything that reads or changes the batch (``begin_batch``, ``end_batch``, ``close``, a step
  of host arrays) first waits for the queued steps; an error in the builder is raised by the
  next call. Host (numpy, CPU tensor) steps are built in ``end_step`` itself;
- ``step_builder``: a step's records from all layers x rows as one 2-D problem (points A, B;
  ``step_numpy``), sampling, the KVBackend for point C;
- ``record_lists``, ``record_layout``, ``record_bytes``: the records' bytes, by numpy
  templates or, with numba (extra ``fast``; ``KVTIER_NO_NUMBA=1`` turns it off), one kernel
  (``step_numba``); both paths write byte-identical traces. Complete JSONL lines go to the
  background writer (``writer``).

torch is never imported by the tracer itself.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kvtier.backend import HBMOnlyBackend, KVBackend
from kvtier.schema import SCHEMA_VERSION, SUMMARY_FILE, Summary, TraceMeta
from kvtier.trace import step_numba
from kvtier.trace.background_builder import BackgroundBuilder
from kvtier.trace.host_copy import PinnedCopies, as_numpy, is_torch
from kvtier.trace.prefix import PrefixAnalyzer
from kvtier.trace.record_layout import record_head
from kvtier.trace.settings import TraceSettings
from kvtier.trace.step_buffer import check_topk
from kvtier.trace.step_builder import LayerTopk, StepBuilder, StepJob, sample_uniform
from kvtier.trace.summary import SummaryBuilder, backend_sections
from kvtier.trace.writer import RequestLog, TraceWriter, write_json_atomic

__all__ = ["Tracer", "WithRequestInfo", "kv_bytes_per_token", "sample_uniform"]


def kv_bytes_per_token(kv_lora_rank: int, qk_rope_head_dim: int, index_head_dim: int,
                       cache_dtype_bytes: int = 2, indexer_dtype_bytes: int = 1,
                       indexer_scale_bytes: int = 4, fp8_mla: bool = False) -> int:
    """KV bytes one token occupies in one layer (what a fetch of that token reads).

    bf16 MLA (the reference): ``(kv_lora_rank + qk_rope_head_dim) * cache_dtype_bytes``
    + indexer key ``index_head_dim * indexer_dtype_bytes`` + its ``indexer_scale_bytes`` scale.
    671B: (512 + 64) * 2 + 128 * 1 + 4 = 1284 B (78,324 B over 61 layers).
    ``fp8_mla`` (vLLM/FlashMLA ``fp8_ds_mla``): 512 fp8 latent + one fp32 scale per 128 values
    + 64 bf16 rope = 656 B, so 656 + 132 = 788 B for 671B.
    """
    for name, value in (("kv_lora_rank", kv_lora_rank), ("qk_rope_head_dim", qk_rope_head_dim),
                        ("index_head_dim", index_head_dim)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if fp8_mla:
        mla = kv_lora_rank + (-(-kv_lora_rank // 128)) * 4 + qk_rope_head_dim * 2
    else:
        mla = (kv_lora_rank + qk_rope_head_dim) * cache_dtype_bytes
    return mla + index_head_dim * indexer_dtype_bytes + indexer_scale_bytes


def _request_id(value: Any) -> int:
    """An integer request id (numpy ints too); bools, strings and floats are refused."""
    if isinstance(value, (bool, np.bool_)) or not hasattr(value, "__index__"):
        raise ValueError(f"request ids are ints (0, 1, 2, ... in admission order), got {value!r}; "
                         "what identifies a request in its dataset goes to requests.jsonl (info=)")
    return int(value)


class Tracer:
    """Records DSA top-k selections of one run into ``out_dir`` (rank 0 only).

    On ranks other than 0 every method is a no-op and ``close`` returns None, so callers need
    no rank checks. Usable as a context manager (closes on exit).
    """

    def __init__(self, settings: TraceSettings, out_dir: str | os.PathLike, *, run_name: str,
                 dataset: str, backend: KVBackend | None = None,
                 kv_bytes_per_token: int | None = None, rank: int = 0, world_size: int = 1,
                 config: dict | None = None, force: bool = False, background: bool = True,
                 build_in_background: str = "cuda", max_pending_steps: int = 4) -> None:
        self.enabled = rank == 0
        self.settings = settings
        self.run_name = run_name
        self.dataset = dataset
        self.rank = rank
        self.world_size = world_size
        self.summary: Summary | None = None
        self._next_id = 0  # request ids are 0, 1, 2, ... in admission order (on every rank)
        if max_pending_steps < 1:
            raise ValueError(f"max_pending_steps must be >= 1, got {max_pending_steps}")
        if build_in_background not in ("cuda", "always", "never"):
            raise ValueError("build_in_background must be 'cuda', 'always' or 'never', "
                             f"got {build_in_background!r}")
        #: steps built on the builder thread / in the caller, and the caller's waits for a
        #: free queue slot (back-pressure): count and seconds
        self.build_stats = {"background_steps": 0, "caller_steps": 0, "waits": 0, "wait_s": 0.0}
        if not self.enabled:
            return
        bpt = settings.kv_bytes_per_token or kv_bytes_per_token
        if backend is None:
            if not bpt:
                raise ValueError("kv_bytes_per_token is needed for the default HBM backend "
                                 "(derive it with kv_bytes_per_token(...) or pass --kv-bytes-per-token)")
            backend = HBMOnlyBackend(bpt)
        self.backend = backend
        self.out_dir = Path(out_dir)
        full_config = {
            "kv_block_size_tokens": settings.kv_block_size,  # the design note's §5.3 key
            "trace": settings.to_dict(),
            "kv_bytes_per_token": bpt,
            "backend": getattr(backend, "name", type(backend).__name__),
            "rank": rank,
            "world_size": world_size,
            **(config or {}),
        }
        self.config = full_config
        meta = TraceMeta(schema_version=SCHEMA_VERSION, run_name=run_name, dataset=dataset,
                         config=full_config)
        self.writer = TraceWriter(self.out_dir, meta, force=force,
                                  shard_records=settings.shard_records, background=background)
        self.summary_builder = SummaryBuilder(run_name, dataset, full_config)
        self.prefix = PrefixAnalyzer(settings.kv_block_size, settings.prefix_key_tokens)
        self.requests = RequestLog(self.out_dir)
        self._batches = 0
        self._kern = step_numba.load()  # None: the numpy path (no numba, or KVTIER_NO_NUMBA=1)
        self._steps = StepBuilder(settings, backend, record_head(run_name, dataset, rank, world_size),
                                  self.summary_builder, self.writer, self._kern)
        # the step being traced: start_pos, active rows, its layers so far, bitmap path?
        self._step: int | None = None
        self._active: np.ndarray | None = None
        self._layers: list[LayerTopk] = []
        self._use_bits = False
        self._pinned = PinnedCopies()
        self._background = build_in_background  # which steps the builder thread builds
        self._builder = BackgroundBuilder(self._steps.build, self._release, max_pending_steps,
                                          self.build_stats)
        self._closed = False

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Tracer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def begin_batch(self, request_ids: Sequence[int] | None, prompts: Sequence[Sequence[int]],
                    info: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        """New requests enter: prefix analysis (point D), ``backend.admit`` and one line each in
        ``requests.jsonl``. Returns their request ids.

        ``request_ids`` are the integer ids of the trace, 0, 1, 2, ... in admission order
        (the caller's numbering, checked), or None to let the tracer number them. ``info``
        (one mapping per request) is what identifies each request in its dataset (sample
        id, conversation and turn, arrival row, ...); it goes to ``requests.jsonl`` next to
        the tracer's own facts (prompt length, prefix key and blocks, batch)."""
        n = len(prompts)
        if request_ids is None:
            request_ids = list(range(self._next_id, self._next_id + n))
        if not self.enabled:
            self._next_id += n
            return list(request_ids)
        self._builder.drain()
        if len(request_ids) != n:
            raise ValueError(f"{len(request_ids)} request ids but {n} prompts")
        if info is not None and len(info) != n:
            raise ValueError(f"{len(info)} request infos but {n} prompts")
        ids = [_request_id(r) for r in request_ids]
        want = list(range(self._next_id, self._next_id + n))
        if ids != want:
            raise ValueError(f"request ids must be 0, 1, 2, ... in admission order: expected "
                             f"{want}, got {ids}")
        self._next_id += n
        states = []
        rows = []
        for i, (rid, prompt) in enumerate(zip(ids, prompts, strict=True)):
            state = self.prefix.admit(prompt)
            states.append(state)
            self.backend.admit(rid, len(prompt), state.hashes)
            row = {"request_id": rid}
            if info is not None:
                row.update((k, v) for k, v in info[i].items() if k != "request_id")
            row.update(prompt_len=len(prompt), prefix_key=state.key,
                       prefix_blocks=state.n_prefix_blocks,
                       prefix_cached_blocks=state.cached_blocks, batch=self._batches)
            rows.append(row)
        self.requests.write(rows)
        self._batches += 1
        self._steps.set_batch(ids, states)
        return ids

    @property
    def next_request_id(self) -> int:
        """The request id the next admitted request gets (the number admitted so far)."""
        return self._next_id

    def start_step(self, start_pos: int, active: Sequence[bool] | None = None) -> None:
        """Before a 1-token decode forward at ``start_pos``; inactive rows are not recorded."""
        if not self.enabled:
            return
        self._builder.raise_error()
        if start_pos < 0:
            raise ValueError(f"start_pos must be >= 0, got {start_pos}")
        n = len(self._steps.request_ids)
        act = np.ones(n, dtype=bool) if active is None else np.asarray(active, dtype=bool)
        if act.shape != (n,):
            raise ValueError(f"active has {act.size} entries for a batch of {n}")
        self._step = int(start_pos)
        self._active = act
        self._layers = []
        # numba path: keep per-row bitmaps of each layer instead of a copy of its indices
        self._use_bits = self._kern is not None and start_pos + 1 <= step_numba.BITMAP_MAX_SEQ

    def on_topk(self, layer_id: int, indices: Any, scores: Any = None) -> None:
        """Right after the indexer's top-k of one layer: copy [B, K] indices (and scores) off
        the device without waiting for it."""
        if not self.enabled:
            return
        if self._step is None:
            raise RuntimeError("on_topk called outside start_step/end_step")
        slot = len(self._layers)
        if slot == 0 and scores is not None:  # scores need the indices' order: copy them
            self._use_bits = False
        if is_torch(indices) and indices.is_cuda:
            pinned, event = self._pinned.copy(slot, "i", indices)
            sc = None
            if scores is not None:
                sc, event = self._pinned.copy(slot, "s", scores)
            self._layers.append(LayerTopk(int(layer_id), pinned, sc, event))
            return
        arr = as_numpy(indices)
        check_topk(layer_id, arr, len(self._steps.request_ids))
        if self._background == "always":  # built later on the builder thread: keep a copy
            sc = None if scores is None else np.array(as_numpy(scores), dtype=np.float64)
            self._layers.append(LayerTopk(int(layer_id), np.array(arr, copy=True), sc, None))
            return
        if self._builder.busy:
            self._builder.drain()  # host arrays are stored right here: the builder must be idle
        self._steps.buffer.store(slot, layer_id, arr, self._step + 1, self._use_bits)
        if scores is not None:
            scores = np.array(as_numpy(scores), dtype=np.float64, copy=True)
        self._layers.append(LayerTopk(int(layer_id), None, scores, None))

    def end_step(self, wall_time_s: float | None) -> None:
        """After the forward: build all records of the step, point C, and write them (on the
        builder thread for CUDA top-k, see the module docstring)."""
        if not self.enabled:
            return
        if self._step is None:
            raise RuntimeError("end_step without start_step")
        self._builder.raise_error()
        layers = self._layers
        assert self._active is not None
        job = StepJob(self._step, self._active, self._use_bits, layers, wall_time_s)
        self._step, self._layers = None, []
        deferred = any(lay.indices is not None for lay in layers)
        if deferred and (self._background == "always"
                         or (self._background == "cuda" and layers[0].event is not None)):
            job.pinned = self._pinned.take()
            self._builder.submit(job)
            return
        self._steps.build(job)
        self.build_stats["caller_steps"] += 1

    def _release(self, job: StepJob) -> None:
        """A step the builder thread is done with: its pinned buffers can be reused."""
        self._pinned.recycle(job.pinned)

    def end_batch(self) -> None:
        """The batch's requests finished: ``backend.release`` each (after the queued steps)."""
        if not self.enabled:
            return
        self._builder.drain()
        for rid in self._steps.request_ids:
            self.backend.release(rid)
        self._steps.set_batch([], [])

    def close(self, serving: Any = None, skipped: dict[str, int] | None = None) -> Summary | None:
        """Flush the writer, write ``summary.json`` and return it (None on other ranks).
        ``serving``/``skipped`` are the optional sections only the caller knows."""
        if not self.enabled:
            return None
        if self._closed:
            return self.summary
        self._closed = True
        self._builder.stop()
        self._builder.raise_error()
        if self.build_stats["waits"]:
            warnings.warn(
                f"trace: the model waited {self.build_stats['waits']} times "
                f"({self.build_stats['wait_s']:.3f} s) for the record builder "
                f"(queue of {self._builder.jobs.maxsize} steps full); no step was dropped",
                stacklevel=2)
        if self._steps.request_ids:
            self.end_batch()
        self.requests.close()
        self.writer.close()
        sections = backend_sections(self.backend.summary())
        self.summary = self.summary_builder.build(serving=serving, skipped=skipped, **sections)
        write_json_atomic(self.out_dir / SUMMARY_FILE, self.summary)
        return self.summary


class WithRequestInfo:
    """A tracer whose ``begin_batch`` also hands the batch's dataset identity (one mapping per
    request, for ``requests.jsonl``) to the tracer, for callers such as
    ``kvtier.model.generate.generate`` that pass request ids and prompts only."""

    def __init__(self, tracer: Any, info: Sequence[Mapping[str, Any]]) -> None:
        self.tracer = tracer
        self.info = list(info)

    def begin_batch(self, request_ids: Sequence[int] | None, prompts: Sequence[Sequence[int]],
                    info: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        return self.tracer.begin_batch(request_ids, prompts, self.info if info is None else info)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tracer, name)
