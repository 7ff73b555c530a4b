"""The tracer: turns the indexer's top-k of every decode step x layer into trace records.

The model calls ``begin_batch`` / ``start_step`` / ``on_topk`` (every layer) / ``end_step`` /
``end_batch`` / ``close``. ``on_topk`` only copies (on CUDA: non-blocking into pinned host
buffers, plus an event), so the forward never waits for the tracer; the step's records are
then built from all layers x rows as one 2-D numpy problem (see ``kvtier.trace.step_numpy``),
the KVBackend is asked for point C, and complete JSONL lines go to the background writer.

Where the step is built: for CUDA top-k (the model on a GPU) ``end_step`` queues the step to a
background builder thread and returns at once, so records of step t are built while the GPU
computes step t+1 (``build_in_background="always"``: host arrays too, copied in ``on_topk``;
``"never"``: every step in ``end_step``). The queue holds ``max_pending_steps``; when the builder falls behind,
``end_step`` waits for a free slot (back-pressure, never a dropped step), and the waits are
counted in ``build_stats`` and reported by a warning at ``close``. Anything that reads or
changes the batch (``begin_batch``, ``end_batch``, ``close``, a step of host arrays) first
waits for the queued steps; an error in the builder is raised by the next call. Host (numpy,
CPU tensor) steps are built in ``end_step`` itself, as before.

With numba (extra ``fast``; ``KVTIER_NO_NUMBA=1`` turns it off) the same happens in compiled
kernels (``kvtier.trace.step_numba``): ``on_topk`` keeps per-row bitmaps instead of a copy, and one
kernel writes all records of a step. Both paths write byte-identical traces.

torch is never imported here: a torch tensor is recognised by its type's module.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
import warnings
from collections import deque
from collections.abc import Mapping, Sequence
from functools import partial
from itertools import chain
from operator import attrgetter, is_
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from kvtier.backend import HBMOnlyBackend, KVBackend, LayerAccess
from kvtier.schema import (
    EVENT_DSA_TOPK,
    SCHEMA_VERSION,
    SUMMARY_FILE,
    TIER_NAMES,
    Summary,
    TraceMeta,
    record_encoder,
)
from kvtier.trace import step_numba
from kvtier.trace.intlist_json import MAX_VALUE, encode_elements, encode_int_rows
from kvtier.trace.prefix import PrefixAnalyzer, PrefixState
from kvtier.trace.settings import TraceSettings
from kvtier.trace.step_numpy import StepStats, compute_step_stats, step_stats_from_bits
from kvtier.trace.summary import SummaryBuilder, backend_sections
from kvtier.trace.writer import RequestLog, TraceWriter, write_json_atomic


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


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _request_id(value: Any) -> int:
    """An integer request id (numpy ints too); bools, strings and floats are refused."""
    if isinstance(value, (bool, np.bool_)) or not hasattr(value, "__index__"):
        raise ValueError(f"request ids are ints (0, 1, 2, ... in admission order), got {value!r}; "
                         "what identifies a request in its dataset goes to requests.jsonl (info=)")
    return int(value)


def _sample_key(seed: int, request_id: int) -> int:
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


# The record's JSON text, in schema field order, as (literal before the field, field kind,
# the field's %-code in the numpy path's template). One layout serves both paths: the numba
# kernel (``step_numba.emit_records``) runs it as a program, the numpy path formats it as one
# bytes template per record, so both write the same bytes (tests compare them). Int lists are
# space-padded fixed-width elements (``kvtier.trace.intlist_json``); a block-id list (LST)
# comes without its ']' (the next literal starts with it), so empty lists need no special
# case. Floats are written with repr (the shortest round-trip form, as msgspec does).
_K = step_numba
_TIER_FIELDS = [(b'],"bytes_read":', _K.INT, b"%d"), (b',"read_ops":', _K.INT, b"%d"),
                (b',"latency_us":', _K.TEXT, b"%s"), (b',"batch_size":', _K.INT, b"%d")]
_LAYOUT = [
    (b"", _K.TEXT, b"%s"),  # '{"event":..., "request_id":<id>' (per batch row)
    (b',"layer_id":', _K.INT, b"%d"), (b',"step_idx":', _K.INT, b"%d"),
    (b',"seq_len_current":', _K.INT, b"%d"), (b',"unique_token_pos_count":', _K.INT, b"%d"),
    (b',"offset_min":', _K.INT, b"%d"), (b',"offset_p50":', _K.HALF, b"%r"),
    (b',"offset_max":', _K.INT, b"%d"), (b',"block_size_tokens":', _K.INT, b"%d"),
    (b',"selected_block_ids":[', _K.LST, b"%s"), (b'],"unique_blocks":', _K.INT, b"%d"),
    (b',"tokens_per_touched_block":{"mean":', _K.TEXT, b"%r"), (b',"p50":', _K.HALF, b"%r"),
    (b',"p95":', _K.TEXT, b"%r"),
    (b'},"kv_fetch":{"hbm":{"hit_blocks":[', _K.LST, b"%s"), *_TIER_FIELDS,
    (b'},"local_pool":{"hit_blocks":[', _K.LST, b"%s"), *_TIER_FIELDS,
    (b'},"remote_pool":{"hit_blocks":[', _K.LST, b"%s"), *_TIER_FIELDS,
    (b'}},"prefix":{"prefix_cache_hit":', _K.TEXT, b"%s"),
    (b',"prefix_cached_blocks":', _K.INT, b"%d"), (b',"prefix_key":', _K.TEXT, b"%s"),
    (b',"intersection_ratio":', _K.TEXT, b"%r"), (b',"intersection_blocks":[', _K.LST, b"%s"),
    (b']},"selected_token_pos":[', _K.POS, b"%s"),
]
_CLOSE = b',"scores_stats":null}\n'
#: column of each field in the program (the kernel's ``vals`` / the template's arguments)
_F = {name: i for i, name in enumerate([
    "head", "layer", "step", "seq", "n_tok", "off_min", "off_p50", "off_max", "bs", "blocks",
    "unique", "tpb_mean", "tpb_p50", "tpb_p95",
    "hbm", "hbm_bytes", "hbm_ops", "hbm_lat", "hbm_batch",
    "local", "local_bytes", "local_ops", "local_lat", "local_batch",
    "remote", "remote_bytes", "remote_ops", "remote_lat", "remote_batch",
    "hit", "cached", "key", "ratio", "inter", "pos"])}
assert len(_F) == len(_LAYOUT)


def _segments() -> list[bytes]:
    """The numpy path's per-record templates: ``_LAYOUT`` cut at every list field, so a
    record is ``seg[0] % (...)``, list, ``seg[1] % (...)``, list, ..., the positions, the
    tail; the lists are written as they are (``writev``), never copied into the text."""
    segs, cur = [], b""
    for lit, kind, code in _LAYOUT:
        if kind in (_K.LST, _K.POS):
            segs.append(cur + lit)
            cur = b""
        else:
            cur += lit + code
    return segs


_SEGMENTS = _segments()
assert len(_SEGMENTS) == 6  # before: blocks, hbm, local_pool, remote_pool, intersection, positions


def _fast_program() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``_LAYOUT`` for ``step_numba.emit_records``: (literal bytes, literal starts, kinds)."""
    lits = [lit for lit, _kind, _code in _LAYOUT] + [_CLOSE]
    starts = np.zeros(len(lits) + 1, np.int64)
    np.cumsum([len(x) for x in lits], out=starts[1:])
    return (np.frombuffer(b"".join(lits) + bytes(8), np.uint8), starts,
            np.array([kind for _lit, kind, _code in _LAYOUT], np.int64))


_FAST_LITS, _FAST_LIT_STARTS, _FAST_KINDS = _fast_program()
_NO_HIST = np.zeros(1, np.int64)  # emit_records' offset histogram when step_rows counted already


def _list_width(flat: np.ndarray, starts: np.ndarray) -> int:
    """Element width ``kvtier.trace.intlist_json`` uses for these sorted rows (0: compact)."""
    vmax = int(flat[starts[1:] - 1].max())
    return 0 if vmax > MAX_VALUE else len(str(vmax)) + 1


def _table(width: int) -> np.ndarray:
    """Digit table for list width ``width`` (a dummy for compact lists)."""
    return step_numba.digit_table(width, 10 ** (width - 1)) if width else np.zeros(1, np.uint64)


class _Lists:
    """The block-id lists of the records of one step and their kv_fetch scalars.

    Lists are spans ``lv[lo[v]:hi[v]]``: span j < n is record j's ``selected_block_ids``,
    n + j its ``prefix.intersection_blocks`` (the first ``intersection`` of them: prefix
    blocks are ids 0 .. n_prefix - 1), 2n the empty list, and tier lists that are neither
    the whole row nor empty are appended after the step's block ids. ``tier_span[t, j]`` is
    record j's span for tier t; ``ints[t]`` = (bytes_read, read_ops, batch_size) arrays;
    ``lat[t]`` = latency text index per record into ``lat_texts``.
    """

    __slots__ = ("lv", "lo", "hi", "width", "tier_span", "ints", "lat", "lat_texts")

    def __init__(self, st: StepStats, fetches: list, views: list, backend: str,
                 enc: msgspec.json.Encoder) -> None:
        n = len(fetches)
        bstart = st.block_starts
        first = bstart[:-1]
        lo = [first, first, np.zeros(1, np.int64)]
        hi = [bstart[1:], first + st.intersection, np.zeros(1, np.int64)]
        extra: list[np.ndarray] = []
        n_spans = 2 * n + 1
        n_vals = int(bstart[-1])
        vmax = int(st.block_ids[bstart[1:] - 1].max()) if n else 0  # rows are sorted
        self.tier_span = np.empty((len(TIER_NAMES), n), np.int64)
        self.ints = []
        total = np.zeros(n, np.int64)
        rec = np.arange(n, dtype=np.int64)
        scalars = attrgetter("bytes_read", "read_ops", "batch_size")
        tier_lats = []
        for t, name in enumerate(TIER_NAMES):  # C-level maps over the step's answers
            tiers = list(map(attrgetter(name), fetches))
            hits = list(map(attrgetter("hit_blocks"), tiers))
            lens = np.fromiter(map(len, hits), np.int64, n)
            total += lens
            if not lens.any():  # a tier that served none of the step's rows (the pools, HBM-only)
                span = np.full(n, 2 * n, np.int64)
            else:
                same = np.fromiter(map(is_, hits, views), bool, n)
                span = np.where(same, rec, 2 * n)
                for j in np.flatnonzero(~same & (lens > 0)).tolist():
                    arr = np.asarray(hits[j], dtype=np.int64)
                    extra.append(arr)
                    vmax = max(vmax, int(arr.max()))
                    lo.append(np.array([n_vals], np.int64))
                    n_vals += len(arr)
                    hi.append(np.array([n_vals], np.int64))
                    span[j] = n_spans
                    n_spans += 1
            self.tier_span[t] = span
            cols = np.array(list(map(scalars, tiers)), dtype=np.int64).reshape(n, 3)
            self.ints.append((cols[:, 0], cols[:, 1], cols[:, 2]))
            tier_lats.append(list(map(attrgetter("latency_us"), tiers)))
        # each distinct latency's text once (dict.fromkeys keeps first-seen order)
        lat_index = {v: i for i, v in enumerate(dict.fromkeys(chain.from_iterable(tier_lats)))}
        self.lat = [np.fromiter(map(lat_index.__getitem__, lats), np.int64, n) for lats in tier_lats]
        if (total != np.diff(bstart)).any():
            j = int(np.flatnonzero(total != np.diff(bstart))[0])
            raise ValueError(f"backend {backend!r}: the tiers' hit_blocks of a row hold "
                             f"{int(total[j])} blocks, the row selected {int(bstart[j + 1] - bstart[j])} "
                             "(the three lists must partition its block_ids)")
        self.lat_texts = [enc.encode(v) for v in lat_index]
        self.lv = np.concatenate([st.block_ids[:int(bstart[-1])], *extra]) if extra else st.block_ids
        self.lo = np.concatenate(lo)
        self.hi = np.concatenate(hi)
        self.width = 0 if vmax > MAX_VALUE else len(str(vmax)) + 1

    @classmethod
    def hbm_only(cls, st: StepStats, block_bytes: int, wall_us: float | None,
                 enc: msgspec.json.Encoder) -> _Lists:
        """What ``HBMOnlyBackend.fetch`` answers, as columns: HBM serves every row's blocks
        (its list is the row's), ``blocks x block_bytes`` bytes, one read, the step's wall
        time; the pools nothing."""
        self = cls.__new__(cls)
        n = len(st.unique_blocks)
        bstart = st.block_starts
        first = bstart[:-1]
        self.lv = st.block_ids
        self.lo = np.concatenate([first, first, np.zeros(1, np.int64)])
        self.hi = np.concatenate([bstart[1:], first + st.intersection, np.zeros(1, np.int64)])
        vmax = int(st.block_ids[bstart[1:] - 1].max()) if n else 0
        self.width = 0 if vmax > MAX_VALUE else len(str(vmax)) + 1
        self.tier_span = np.full((len(TIER_NAMES), n), 2 * n, np.int64)
        self.tier_span[0] = np.arange(n, dtype=np.int64)
        unique = st.unique_blocks.astype(np.int64)
        zeros = np.zeros(n, np.int64)
        self.ints = [(unique * block_bytes, np.ones(n, np.int64), unique), (zeros, zeros, zeros),
                     (zeros, zeros, zeros)]
        self.lat_texts = [enc.encode(wall_us)] if wall_us is None else [enc.encode(wall_us), b"null"]
        null = 0 if wall_us is None else 1
        self.lat = [zeros, np.full(n, null, np.int64), np.full(n, null, np.int64)]
        return self

    def texts(self, scratch: np.ndarray | None = None) -> tuple[list, np.ndarray | None]:
        """Each span's JSON text without brackets (the numpy path), and the buffer they are
        views of (``scratch`` when large enough; None for the compact fallback)."""
        lo, hi = self.lo.tolist(), self.hi.tolist()
        if self.width:
            w = self.width
            buf = encode_elements(self.lv, w, scratch)
            mv = memoryview(buf)
            return [mv[a * w:b * w - 1] if b > a else b"" for a, b in zip(lo, hi, strict=True)], buf
        lv = self.lv
        return [msgspec.json.encode(lv[a:b].tolist())[1:-1] for a, b in zip(lo, hi, strict=True)], None


class _Job:
    """One step queued for the background builder."""

    __slots__ = ("step", "active", "use_bits", "layers", "wall", "pinned")

    def __init__(self, step, active, use_bits, layers, wall, pinned) -> None:
        self.step, self.active, self.use_bits = step, active, use_bits
        self.layers, self.wall, self.pinned = layers, wall, pinned


class _Layer:
    """One on_topk call waiting for end_step."""

    __slots__ = ("layer_id", "indices", "scores", "event")

    def __init__(self, layer_id: int, indices: Any, scores: Any, event: Any) -> None:
        self.layer_id = layer_id
        self.indices = indices
        self.scores = scores
        self.event = event


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
        self.builder = SummaryBuilder(run_name, dataset, full_config)
        self.prefix = PrefixAnalyzer(settings.kv_block_size, settings.prefix_key_tokens)
        self.requests = RequestLog(self.out_dir)
        self._encoder = record_encoder()
        enc = self._encoder
        self._head = (b'{"event":"' + EVENT_DSA_TOPK.encode() + b'","run_name":' + enc.encode(run_name)
                      + b',"dataset":' + enc.encode(dataset)
                      + b',"rank":%d,"world_size":%d,"request_id":' % (rank, world_size))
        self._batches = 0
        self._request_ids: list[int] = []
        self._prefix_states: list[PrefixState] = []
        self._sample_keys = np.zeros(0, np.uint64)
        self._n_prefix = np.zeros(0, np.int64)
        self._step: int | None = None
        self._active: np.ndarray | None = None
        self._layers: list[_Layer] = []
        self._pinned: dict[tuple, Any] = {}  # the set the current step copies into
        self._free_pinned: list[dict] = []
        self._background = build_in_background  # which steps the builder thread builds
        self._jobs: queue.Queue = queue.Queue(maxsize=max_pending_steps)
        self._builder: threading.Thread | None = None
        self._builder_error: BaseException | None = None
        self._free_lock = threading.Lock()
        self._proc_step = 0  # the step being built (caller or builder thread, never both)
        self._proc_bits = False
        self._ibuf: np.ndarray | None = None
        self._bits: np.ndarray | None = None
        self._use_bits = False
        self._kern = step_numba.load()  # None: the numpy path (no numba, or KVTIER_NO_NUMBA=1)
        self._free_out: deque[np.ndarray] = deque()  # output buffers the writer has written
        self._stats_scratch: dict = {}
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
        self._drain()
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
        self._request_ids = ids
        self._prefix_states = []
        rows = []
        for i, (rid, prompt) in enumerate(zip(ids, prompts, strict=True)):
            state = self.prefix.admit(prompt)
            self._prefix_states.append(state)
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
        self._n_prefix = np.array([s.n_prefix_blocks for s in self._prefix_states], dtype=np.int64)
        self._sample_keys = np.array([_sample_key(self.settings.sample_seed, r) for r in ids],
                                     dtype=np.uint64)
        return ids

    @property
    def next_request_id(self) -> int:
        """The request id the next admitted request gets (the number admitted so far)."""
        return self._next_id

    def start_step(self, start_pos: int, active: Sequence[bool] | None = None) -> None:
        """Before a 1-token decode forward at ``start_pos``; inactive rows are not recorded."""
        if not self.enabled:
            return
        self._raise_builder_error()
        if start_pos < 0:
            raise ValueError(f"start_pos must be >= 0, got {start_pos}")
        n = len(self._request_ids)
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
        if _is_torch(indices) and indices.is_cuda:
            pinned, event = self._to_pinned(slot, "i", indices)
            sc = None
            if scores is not None:
                sc, event = self._to_pinned(slot, "s", scores)
            self._layers.append(_Layer(int(layer_id), pinned, sc, event))
            return
        arr = self._numpy(indices)
        self._check_shape(layer_id, arr)
        if self._background == "always":  # built later on the builder thread: keep a copy
            sc = None if scores is None else np.array(self._numpy(scores), dtype=np.float64)
            self._layers.append(_Layer(int(layer_id), np.array(arr, copy=True), sc, None))
            return
        if self._builder is not None and self._jobs.unfinished_tasks:
            self._drain()  # host arrays are built right here: the builder must be idle
        self._proc_step, self._proc_bits = self._step, self._use_bits
        self._store_indices(slot, layer_id, arr)
        if scores is not None:
            scores = np.array(self._numpy(scores), dtype=np.float64, copy=True)
        self._layers.append(_Layer(int(layer_id), None, scores, None))

    @staticmethod
    def _numpy(x: Any) -> np.ndarray:
        if _is_torch(x):
            x = x.detach()
            if x.dtype.is_floating_point and x.element_size() < 4:
                x = x.float()
            return x.numpy()
        return np.asarray(x)

    def _check_shape(self, layer_id: int, arr: np.ndarray) -> None:
        n_batch = len(self._request_ids)
        if arr.ndim != 2 or arr.shape[0] != n_batch or arr.shape[1] == 0:
            raise ValueError(f"layer {layer_id}: indices must have shape [{n_batch}, K] with K > 0, "
                             f"got {list(arr.shape)}")
        if arr.dtype.kind not in "iu":
            raise ValueError(f"layer {layer_id}: indices must be integers, got {arr.dtype}")

    def _store_indices(self, slot: int, layer_id: int, arr: np.ndarray) -> None:
        """Copy one layer into the step's [layers, B, K] buffer (int32 while positions fit),
        checking the range first so the narrowing copy cannot wrap a bad index."""
        seq_len = self._proc_step + 1
        if self._proc_bits:
            self._store_bits(slot, layer_id, arr)
            return
        amax = None if self._kern is None else self._copy_checked(slot, arr)
        if amax is None:
            amax = int(arr.max())
        if amax >= seq_len:
            raise ValueError(f"layer {layer_id}: selected position {amax} >= seq_len_current {seq_len} "
                             f"(a decode step at start_pos {seq_len - 1} sees positions 0..{seq_len - 1})")
        dtype = np.int32 if seq_len < 2**31 else np.int64
        buf = self._ibuf
        if (buf is None or buf.dtype != dtype or buf.shape[1:] != arr.shape
                or buf.shape[0] <= slot):
            if slot > 0 and buf is not None and buf.shape[1:] != arr.shape:
                raise ValueError(f"layer {layer_id}: indices shape {list(arr.shape)} differs from "
                                 f"the step's first layer {list(buf.shape[1:])}")
            grown = np.empty((max(2 * slot, 8), *arr.shape), dtype=dtype)
            if slot and buf is not None:
                grown[:slot] = buf[:slot]
            self._ibuf = buf = grown
        if self._kern is None or self._copied != slot:
            np.copyto(buf[slot], arr, casting="unsafe")

    _copied = -1
    _step_k = 0

    def _store_bits(self, slot: int, layer_id: int, arr: np.ndarray) -> None:
        """numba path: one pass over the indices sets the row bitmaps of this layer (what the
        step's sort needs) and takes the max for the range check; nothing else is copied."""
        assert self._kern is not None
        seq_len = self._proc_step + 1
        n_batch, k = arr.shape
        if slot == 0:
            self._step_k = k
        elif k != self._step_k:
            raise ValueError(f"layer {layer_id}: indices shape {list(arr.shape)} differs from "
                             f"the step's first layer {[n_batch, self._step_k]}")
        n_words = (seq_len + 63) >> 6
        bits = self._bits
        if bits is None or bits.shape[1:] != (n_batch, n_words) or bits.shape[0] <= slot:
            grown = np.empty((max(2 * slot, 8, 0 if bits is None else len(bits)), n_batch, n_words),
                             np.uint64)
            if slot and bits is not None:  # same step, so the same row shape
                grown[:slot] = bits[:slot]
            self._bits = bits = grown
        amax = int(self._kern.set_bits(np.ascontiguousarray(arr), bits[slot], seq_len))
        if amax >= seq_len:
            raise ValueError(f"layer {layer_id}: selected position {amax} >= seq_len_current {seq_len} "
                             f"(a decode step at start_pos {seq_len - 1} sees positions 0..{seq_len - 1})")

    def _copy_checked(self, slot: int, arr: np.ndarray) -> int | None:
        """numba path: copy into the step buffer and take the max in one pass (the max of the
        source, so an out-of-range index is still caught). None when the buffer must grow."""
        assert self._kern is not None
        buf = self._ibuf
        dtype = np.int32 if self._proc_step + 1 < 2**31 else np.int64
        self._copied = -1
        if buf is None or buf.dtype != dtype or buf.shape[1:] != arr.shape or buf.shape[0] <= slot:
            return None
        self._copied = slot
        return int(self._kern.copy_max(np.ascontiguousarray(arr), buf[slot]))

    def _to_pinned(self, slot: int, kind: str, x: Any) -> tuple[Any, Any]:
        import torch  # only reached with a CUDA tensor, so torch is already imported

        if not self._pinned:  # first copy of this step: take a free set of pinned buffers
            with self._free_lock:
                self._pinned = self._free_pinned.pop() if self._free_pinned else {}
            self._pinned["in_use"] = True
        key = (slot, kind, tuple(x.shape), x.dtype)
        buf = self._pinned.get(key)
        if buf is None:
            buf = torch.empty(tuple(x.shape), dtype=x.dtype, device="cpu", pin_memory=True)
            self._pinned[key] = buf
        buf.copy_(x.detach(), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return buf, event

    # ------------------------------------------------------------------ the step
    def end_step(self, wall_time_s: float | None) -> None:
        """After the forward: build all records of the step, point C, and write them (on the
        builder thread for CUDA top-k, see the module docstring)."""
        if not self.enabled:
            return
        if self._step is None:
            raise RuntimeError("end_step without start_step")
        self._raise_builder_error()
        layers = self._layers
        deferred = any(lay.indices is not None for lay in layers)
        if deferred and (self._background == "always"
                         or (self._background == "cuda" and layers[0].event is not None)):
            job = _Job(self._step, self._active, self._use_bits, layers, wall_time_s, self._pinned)
            self._step, self._layers, self._pinned = None, [], {}
            self._submit(job)
            return
        step, active, use_bits = self._step, self._active, self._use_bits
        self._step, self._layers = None, []
        self._build_step(step, active, use_bits, layers, wall_time_s)
        self.build_stats["caller_steps"] += 1

    # ------------------------------------------------------------- background builder
    def _submit(self, job: _Job) -> None:
        if self._builder is None:
            self._builder = threading.Thread(target=self._build_loop, name="kvtier-trace-builder",
                                             daemon=True)
            self._builder.start()
        try:
            self._jobs.put_nowait(job)
        except queue.Full:  # the builder is behind: wait (counted), never drop the step
            t0 = time.perf_counter()
            self._jobs.put(job)
            self.build_stats["waits"] += 1
            self.build_stats["wait_s"] += time.perf_counter() - t0

    def _build_loop(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                if self._builder_error is None:
                    self._build_step(job.step, job.active, job.use_bits, job.layers, job.wall)
                    self.build_stats["background_steps"] += 1
            except BaseException as exc:  # raised in the caller by its next call
                self._builder_error = exc
            finally:
                if job is not None and job.pinned:
                    with self._free_lock:
                        self._free_pinned.append(job.pinned)
                self._jobs.task_done()

    def _drain(self) -> None:
        """Wait until every queued step is built; raise the builder's error, if any."""
        if self._builder is not None:
            self._jobs.join()
        self._raise_builder_error()

    def _raise_builder_error(self) -> None:
        exc = self._builder_error
        if exc is not None:
            self._builder_error = None
            raise RuntimeError(f"trace record builder failed: {exc}") from exc

    def _build_step(self, step: int, active: np.ndarray | None, use_bits: bool,
                    layers: list[_Layer], wall_time_s: float | None) -> None:
        """The records of one step (caller thread with the builder idle, or builder thread)."""
        self._proc_step, self._proc_bits = step, use_bits
        if not layers:
            return
        for slot, lay in enumerate(layers):  # copied layers (CUDA: wait for the copy now)
            if lay.indices is not None:
                if lay.event is not None:
                    lay.event.synchronize()
                arr = self._numpy(lay.indices)
                self._check_shape(lay.layer_id, arr)
                self._store_indices(slot, lay.layer_id, arr)
                if lay.event is not None and lay.scores is not None:
                    lay.scores = np.array(self._numpy(lay.scores), dtype=np.float64, copy=True)
        assert active is not None
        rows = np.flatnonzero(active)
        if len(rows) == 0:
            return
        n_batch = len(self._request_ids)
        n_layers = len(layers)
        with_scores = [lay.scores is not None for lay in layers]
        if any(with_scores) and not all(with_scores):
            raise ValueError("scores must be given for every layer of a step or for none")
        all_rows = len(rows) == n_batch
        n_rows = len(rows)
        req_rows = np.tile(rows, n_layers)  # batch row of every (layer, row)
        if use_bits:
            assert self._bits is not None
            bits3 = self._bits[:n_layers]
            bits2 = (bits3 if all_rows else bits3[:, rows]).reshape(n_layers * n_rows, -1)
            stats = step_stats_from_bits(bits2, self._step_k, step + 1, self.settings.kv_block_size,
                                         self._n_prefix[req_rows], scratch=self._stats_scratch)
            self._finish_step(step, layers, rows, stats, wall_time_s)
            return
        assert self._ibuf is not None
        k = self._ibuf.shape[2]
        idx3 = self._ibuf[:n_layers]
        positions = idx3.reshape(-1, k) if all_rows else idx3[:, rows].reshape(-1, k)
        scores2 = None
        if with_scores[0]:
            for lay in layers:
                if lay.scores.shape != (n_batch, k):
                    raise ValueError(f"layer {lay.layer_id}: scores shape {list(lay.scores.shape)} "
                                     f"!= indices shape {[n_batch, k]}")
            sc3 = np.stack([lay.scores for lay in layers])
            scores2 = (sc3 if all_rows else sc3[:, rows]).reshape(-1, k)
        stats = compute_step_stats(positions, step + 1, self.settings.kv_block_size,
                                   self._n_prefix[req_rows], scores2,
                                   keep_scores=self.settings.store_scores, in_place=True,
                                   scratch=self._stats_scratch)
        self._finish_step(step, layers, rows, stats, wall_time_s)

    def _finish_step(self, step: int, layers: list[_Layer], rows: np.ndarray, stats: StepStats,
                     wall_time_s: float | None) -> None:
        """Sampling, point C (the backend) and the records of one step."""
        n_rows = len(rows)
        n_layers = len(layers)
        # sampling: per (request, step), identical for every layer
        if self.settings.sample_rate < 1.0:
            keep_row = sample_uniform(self._sample_keys[rows], step) < self.settings.sample_rate
        else:
            keep_row = np.ones(n_rows, dtype=bool)
        wall_us = None if wall_time_s is None else float(wall_time_s) * 1e6
        ids = [self._request_ids[r] for r in rows]
        keep = np.tile(keep_row, n_layers)
        if type(self.backend) is HBMOnlyBackend:
            # the plain HBM-only backend is stateless and its answer a closed form of the
            # row's blocks: the records' kv_fetch columns are computed directly (what
            # HBMOnlyBackend.fetch returns, byte for byte: tests/test_tracer_fast.py), not
            # one KVFetch object per record (a third of the numba path's per-record time)
            if keep.any():
                lists = _Lists.hbm_only(stats if keep.all() else stats.subset(np.flatnonzero(keep)),
                                        self.settings.kv_block_size * self.backend.kv_bytes_per_token,
                                        wall_us, self._encoder)
                emit = self._emit_fast if self._kern is not None and stats.scores_min is None \
                    else self._emit
                emit(step, layers, rows, ids, stats, None, None, keep, lists)
            return
        fetches = []
        pstarts = stats.row_starts.tolist()
        bstarts = stats.block_starts.tolist()
        # every row's views at once (slices built and applied in C, not a Python loop)
        tp_all = list(map(stats.positions.__getitem__, map(slice, pstarts[:-1], pstarts[1:])))
        bl_all = list(map(stats.block_ids.__getitem__, map(slice, bstarts[:-1], bstarts[1:])))
        for li, lay in enumerate(layers):
            r0 = li * n_rows
            access = LayerAccess(step_idx=step, layer_id=lay.layer_id, request_ids=ids,
                                 token_pos=tp_all[r0:r0 + n_rows], block_ids=bl_all[r0:r0 + n_rows],
                                 block_size=self.settings.kv_block_size, step_wall_us=wall_us)
            got = self.backend.fetch(access)
            if len(got) != n_rows:
                raise ValueError(f"backend {self.backend.name!r} returned {len(got)} results for {n_rows} rows")
            fetches.extend(got)
        for rid in ids:
            self.backend.append(rid, 1)
        if keep.any():
            if self._kern is not None and stats.scores_min is None:
                self._emit_fast(step, layers, rows, ids, stats, fetches, bl_all, keep)
            else:
                self._emit(step, layers, rows, ids, stats, fetches, bl_all, keep)

    def _emit(self, step: int, layers: list[_Layer], rows: np.ndarray, ids: list[int],
              st: StepStats, fetches: list | None, views: list | None, keep: np.ndarray,
              lists: _Lists | None = None) -> None:
        """The numpy path: per record the ``_SEGMENTS`` templates % (fields) around its lists,
        which are spans of one encoded buffer per step (handed to the writer uncopied)."""
        n_rows = len(rows)
        sel = np.flatnonzero(keep)
        n_sel = len(sel)
        whole = n_sel == len(keep)
        sub = st if whole else st.subset(sel)
        # the encoded lists are handed to the writer uncopied: their buffers come from (and,
        # once written, go back to) the pool of output buffers
        scratch = self._out_buffer(8 * len(sub.positions) + 8)
        if sub.positions_2d is not None:
            pos_buf, pos_lo, pos_hi = encode_int_rows(sub.positions_2d, None, scratch)
        else:
            pos_buf, pos_lo, pos_hi = encode_int_rows(sub.positions, sub.row_starts, scratch)
        pos_mv = memoryview(pos_buf)
        pos_lo, pos_hi = pos_lo.tolist(), pos_hi.tolist()
        sel_list = sel.tolist()
        if lists is None:
            lists = _Lists(sub, fetches if whole else [fetches[i] for i in sel_list],
                           views if whole else [views[i] for i in sel_list], self.backend.name,
                           self._encoder)
        span_text, list_buf = lists.texts(self._out_buffer(8 * len(lists.lv) + 8))
        # summary (only what is written, so `kvtier summarize` sees the same records)
        rec_ids = [ids[i % n_rows] for i in sel_list]
        prefix_rows, prefix_blocks = sub.prefix_touches()
        end = step + 1
        self.builder.add(rec_ids, sub.unique_blocks, sub.block_counts, None,
                         sub.ratio, prefix_rows, prefix_blocks,
                         offset_hist=np.bincount(sub.positions, minlength=end)[::-1])
        # python scalars for the per-record fields
        unique = sub.unique_blocks.tolist()
        n_unique_tok = np.diff(sub.row_starts).tolist()
        off_min = sub.offset_min.tolist()
        off_p50 = sub.offset_p50.tolist()
        off_max = sub.offset_max.tolist()
        tpb_mean, tpb_p50, tpb_p95 = sub.tpb_mean.tolist(), sub.tpb_p50.tolist(), sub.tpb_p95.tolist()
        ratio = sub.ratio.tolist()
        tiers = []
        for t in range(len(TIER_NAMES)):
            span = lists.tier_span[t].tolist()
            nbytes, ops, batch = (x.tolist() for x in lists.ints[t])
            lat = [lists.lat_texts[x] for x in lists.lat[t].tolist()]
            tiers.append((span, nbytes, ops, lat, batch))
        (h_sp, h_by, h_op, h_la, h_ba), (l_sp, l_by, l_op, l_la, l_ba), (r_sp, r_by, r_op, r_la, r_ba) = tiers
        if sub.scores_min is not None:
            smin, smean, smax = sub.scores_min.tolist(), sub.scores_mean.tolist(), sub.scores_max.tolist()
        else:
            smin = None
        store = self.settings.store_scores and sub.scores is not None
        enc = self._encoder
        layer_ids = [lay.layer_id for lay in layers]
        # per request row: its head and its prefix facts (identical for every layer)
        row_head = []
        row_prefix = []
        for r in rows.tolist():
            pstate = self._prefix_states[r]
            row_head.append(self._head + b"%d" % self._request_ids[r])
            key = b"null" if pstate.key is None else b'"%s"' % pstate.key.encode()
            row_prefix.append((b"true" if pstate.cache_hit else b"false", pstate.cached_blocks, key))
        bs = self.settings.kv_block_size
        s0_, s1_, s2_, s3_, s4_, s5_ = _SEGMENTS
        pieces: list = []
        add = pieces.extend
        for j, i in enumerate(sel_list):
            li, r = divmod(i, n_rows)
            hit, cached, key = row_prefix[r]
            if smin is None:
                tail = _CLOSE
            else:
                tail = b',"scores_stats":{"min":%r,"mean":%r,"max":%r}' % (smin[j], smean[j], smax[j])
                if store:
                    a, b = sub.row_starts[j], sub.row_starts[j + 1]
                    tail += b',"scores_topk":' + enc.encode(sub.scores[a:b].tolist())
                tail += b"}\n"
            add((
                s0_ % (row_head[r], layer_ids[li], step, end, n_unique_tok[j], off_min[j],
                       off_p50[j], off_max[j], bs),
                span_text[j],
                s1_ % (unique[j], tpb_mean[j], tpb_p50[j], tpb_p95[j]),
                span_text[h_sp[j]],
                s2_ % (h_by[j], h_op[j], h_la[j], h_ba[j]),
                span_text[l_sp[j]],
                s3_ % (l_by[j], l_op[j], l_la[j], l_ba[j]),
                span_text[r_sp[j]],
                s4_ % (r_by[j], r_op[j], r_la[j], r_ba[j], hit, cached, key, ratio[j]),
                span_text[n_sel + j],
                s5_,
                pos_mv[pos_lo[j]:pos_hi[j]],
                tail,
            ))
        # writev of the pieces: the lists go from their encoded buffers to the file uncopied
        owners = [_owner(b) for b in (pos_buf, list_buf) if b is not None]
        owners = [b for b in owners if len(b)]
        self.writer.write(pieces, n_sel, partial(self._free_out.extend, owners))

    def _emit_fast(self, step: int, layers: list[_Layer], rows: np.ndarray, ids: list[int],
                   st: StepStats, fetches: list | None, views: list | None, keep: np.ndarray,
                   lists: _Lists | None = None) -> None:
        """``_emit`` for records without scores via one numba kernel that writes every record
        of the step into one buffer (same bytes; only float reprs, latency texts and the
        backend's answer are gathered in Python, with C-level maps)."""
        assert self._kern is not None
        n_rows = len(rows)
        sel = np.flatnonzero(keep)
        n_sel = len(sel)
        whole = n_sel == len(keep)
        sub = st if whole else st.subset(sel)
        end = step + 1
        if lists is None:
            sel_list = None if whole else sel.tolist()
            lists = _Lists(sub, fetches if whole else [fetches[i] for i in sel_list],
                           views if whole else [views[i] for i in sel_list], self.backend.name,
                           self._encoder)
        # text spans: per batch row (head, cache hit, key), latency texts, then float reprs
        row_list = rows.tolist()
        texts: list[bytes] = [self._head + b"%d" % self._request_ids[r] for r in row_list]
        for r in row_list:
            texts.append(b"true" if self._prefix_states[r].cache_hit else b"false")
        for r in row_list:
            key = self._prefix_states[r].key
            texts.append(b"null" if key is None else b'"%s"' % key.encode())
        lat0 = len(texts)
        texts.extend(lists.lat_texts)
        lens = [len(t) for t in texts]
        # floats: repr of each distinct value once (all are >= 0, so no -0.0 to tell apart)
        float_cols = []
        float_texts = []
        for arr in (sub.tpb_mean, sub.tpb_p95, sub.ratio):
            uniq, inv = np.unique(arr, return_inverse=True)
            strs = list(map(repr, uniq.tolist()))
            float_cols.append(len(lens) + inv)
            float_texts.append("".join(strs))
            lens.extend(map(len, strs))
        text_buf = np.frombuffer(b"".join(texts) + "".join(float_texts).encode() + bytes(8), np.uint8)
        text_starts = np.zeros(len(lens) + 1, np.int64)
        np.cumsum(lens, out=text_starts[1:])
        j = np.arange(n_sel, dtype=np.int64)
        li, r = np.divmod(sel, n_rows)
        kinds = _FAST_KINDS.copy()
        vals = np.empty((n_sel, len(kinds)), np.int64)
        f = _F
        vals[:, f["head"]] = r
        vals[:, f["layer"]] = np.array([lay.layer_id for lay in layers], np.int64)[li]
        vals[:, f["step"]] = step
        vals[:, f["seq"]] = end
        vals[:, f["n_tok"]] = np.diff(sub.row_starts)
        vals[:, f["off_min"]] = sub.offset_min
        vals[:, f["off_max"]] = sub.offset_max
        vals[:, f["bs"]] = self.settings.kv_block_size
        vals[:, f["blocks"]] = j
        vals[:, f["unique"]] = sub.unique_blocks
        vals[:, f["tpb_mean"]] = float_cols[0]
        vals[:, f["tpb_p95"]] = float_cols[1]
        for t, name in enumerate(("hbm", "local", "remote")):
            vals[:, f[name]] = lists.tier_span[t]
            nbytes, ops, batch = lists.ints[t]
            vals[:, f[name + "_bytes"]] = nbytes
            vals[:, f[name + "_ops"]] = ops
            vals[:, f[name + "_lat"]] = lat0 + lists.lat[t]
            vals[:, f[name + "_batch"]] = batch
        vals[:, f["hit"]] = n_rows + r
        vals[:, f["cached"]] = np.array([self._prefix_states[x].cached_blocks for x in row_list], np.int64)[r]
        vals[:, f["key"]] = 2 * n_rows + r
        vals[:, f["ratio"]] = float_cols[2]
        vals[:, f["inter"]] = n_sel + j
        vals[:, f["pos"]] = j
        for col, arr in ((f["off_p50"], sub.offset_p50), (f["tpb_p50"], sub.tpb_p50)):
            twice = arr * 2.0
            if (twice >= 0).all() and (twice < 2.0**52).all() and (twice == np.floor(twice)).all():
                vals[:, col] = twice.astype(np.int64)
            else:  # not x.0 / x.5: Python's repr
                strs = [repr(x).encode() for x in arr.tolist()]
                base = len(text_starts) - 1
                text_buf = np.concatenate([text_buf[:-8], np.frombuffer(b"".join(strs) + bytes(8), np.uint8)])
                text_starts = np.concatenate([text_starts, text_starts[-1] + np.cumsum([len(x) for x in strs])])
                kinds[col] = step_numba.TEXT
                vals[:, col] = base + j
        pos_w = _list_width(sub.positions, sub.row_starts)
        blk_w = lists.width
        row_max = max(map(len, texts[:3 * n_rows]))
        n_lists = len(lists.lv) + int(sub.intersection.sum()) + 2 * int(sub.block_starts[-1])
        bound = (n_sel * (len(_FAST_LITS) + 24 * len(kinds) + 3 * row_max) + len(text_buf)
                 + len(sub.positions) * (pos_w or 21) + n_lists * (blk_w or 21) + 16)
        out = self._out_buffer(bound)
        counted = sub.position_hist is not None
        ohist = sub.position_hist[::-1] if counted else np.zeros(end, np.int64)
        n_bytes = self._kern.emit_records(
            out, _FAST_LITS, _FAST_LIT_STARTS, kinds, vals, text_buf, text_starts,
            sub.positions, sub.row_starts, pos_w, _table(pos_w), lists.lv, lists.lo, lists.hi,
            blk_w, _table(blk_w), _NO_HIST if counted else ohist, -1 if counted else step)
        hot = np.zeros((n_rows, int(self._n_prefix.max(initial=0))), np.int64)
        self._kern.prefix_hist(sub.block_ids, sub.block_starts, sub.intersection, r, hot)
        self.builder.add([ids[i] for i in r.tolist()], sub.unique_blocks, None, None, sub.ratio,
                         None, None, offset_hist=ohist, tpb_hist=sub.count_hist.sum(axis=0),
                         hot_counts=(ids, hot))
        self.writer.write(memoryview(out)[:n_bytes], n_sel, partial(self._free_out.append, out))

    def _out_buffer(self, size: int) -> np.ndarray:
        """An output buffer of at least ``size`` bytes: one the writer has finished with, or a
        new one. Reusing them spares the fresh pages (page faults) of a few MB per step; a
        buffer returns to ``_free_out`` (a deque: appends from the writer thread are atomic)
        once its bytes are on disk."""
        free = self._free_out
        while free:
            buf = free.popleft()
            if len(buf) >= size:
                return buf
        return np.empty(int(size * 1.25), np.uint8)

    def end_batch(self) -> None:
        """The batch's requests finished: ``backend.release`` each (after the queued steps)."""
        if not self.enabled:
            return
        self._drain()
        for rid in self._request_ids:
            self.backend.release(rid)
        self._request_ids = []
        self._prefix_states = []
        self._n_prefix = np.zeros(0, np.int64)
        self._sample_keys = np.zeros(0, np.uint64)

    def close(self, serving: Any = None, skipped: dict[str, int] | None = None) -> Summary | None:
        """Flush the writer, write ``summary.json`` and return it (None on other ranks).
        ``serving``/``skipped`` are the optional sections only the caller knows."""
        if not self.enabled:
            return None
        if self._closed:
            return self.summary
        self._closed = True
        if self._builder is not None:
            self._jobs.put(None)
            self._builder.join()
            self._builder = None
        self._raise_builder_error()
        if self.build_stats["waits"]:
            warnings.warn(
                f"trace: the model waited {self.build_stats['waits']} times "
                f"({self.build_stats['wait_s']:.3f} s) for the record builder "
                f"(queue of {self._jobs.maxsize} steps full); no step was dropped",
                stacklevel=2)
        if self._request_ids:
            self.end_batch()
        self.requests.close()
        self.writer.close()
        sections = backend_sections(self.backend.summary())
        self.summary = self.builder.build(serving=serving, skipped=skipped, **sections)
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


def _owner(buf: np.ndarray) -> np.ndarray:
    """The array a buffer is a view of, to be reused as scratch by the next step (the fallback
    encoder returns a view of ``bytes``, which cannot be reused)."""
    if isinstance(buf.base, np.ndarray):
        return buf.base
    return buf if buf.flags.writeable else np.zeros(0, np.uint8)
