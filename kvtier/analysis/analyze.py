"""``analyze(trace)``: one streaming pass over a trace, every metric at every block size.

Chunks of records come from ``kvtier.analysis.source`` (bounded memory); each chunk is
validated (``kvtier.analysis.chunk``), then feeds the trace-level sections (read
amplification 1 ... 512, offsets by layer, prefix overlap, per-tier fetch) once and the
block-size sections (``kvtier.analysis.locality``) once per requested block size, all from
``selected_token_pos`` re-bucketed at that size. docs/ANALYSIS.md defines every number.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from kvtier.analysis.amplification import ReadAmplification
from kvtier.analysis.chunk import ALL_COLUMNS, Chunk, ChunkBuilder, list_values, normalise
from kvtier.analysis.kernels import kernels
from kvtier.analysis.locality import BlockSizeAnalysis, Records
from kvtier.analysis.prefix import PrefixOverlap
from kvtier.analysis.source import ReadLog, iter_columns
from kvtier.analysis.state import StepOrdinals, StreamIndex
from kvtier.analysis.tiers import TierBreakdown, sweep_table
from kvtier.analysis.union import StepUnion
from kvtier.trace.reader import TraceError, find_trace, warn_skipped

#: 2: ``skipped`` counts lines that are not records by reason (was one ``malformed_lines``)
FORMAT_VERSION = 2
#: offset histogram edges (tokens): 0, 1, 2, then 2 bins per octave up to 2**24
OFFSET_EDGES = np.unique(np.concatenate([
    [0], np.floor(2.0 ** (np.arange(0, 49) / 2.0)).astype(np.int64)]))


class AnalysisError(ValueError):
    """Bad input or settings; one line naming the file, field or flag."""


def _positive_sorted(values, flag: str, allow_empty: bool = False) -> tuple[int, ...]:
    vals = tuple(sorted({int(v) for v in values}))
    if not vals and not allow_empty:
        raise AnalysisError(f"{flag}: empty list")
    if any(v <= 0 for v in vals):
        raise AnalysisError(f"{flag}: values must be > 0, got {list(values)}")
    return vals


@dataclass
class AnalysisSettings:
    """Every knob of the analysis (the ``kvtier analyze`` flags, same names and defaults)."""

    block_sizes: tuple[int, ...] | None = None  # None: the trace's own
    key_mode: str = "request_layer"
    step_union: bool = False
    ws_windows: tuple[int, ...] = (1, 4, 16, 64)
    recent_token_windows: tuple[int, ...] = (256, 1024, 4096)
    recent_block_windows: tuple[int, ...] = (4, 16, 64)
    reuse_cap_steps: int = 2048
    lru_caps: tuple[int, ...] = (128, 256, 512, 1024)
    max_steps_per_stream: int = 0  # 0: all
    shared_samples: int = 1 << 18  # 0: exact shared-cache curves
    tiers: str = "memfabric"
    kv_bytes_per_token: int | None = None
    sweeps: tuple[str, ...] = field(default_factory=tuple)

    def check(self) -> AnalysisSettings:
        """A normalised copy (sorted, de-duplicated lists); raises ``AnalysisError``."""
        if self.key_mode not in ("request_layer", "request"):
            raise AnalysisError(f"--key-mode must be request_layer or request, "
                                f"got {self.key_mode!r}")
        if self.reuse_cap_steps < 0:
            raise AnalysisError(f"--reuse-cap-steps must be >= 0, got {self.reuse_cap_steps}")
        if self.max_steps_per_stream < 0:
            raise AnalysisError(f"--max-steps-per-stream must be >= 0, "
                                f"got {self.max_steps_per_stream}")
        if self.shared_samples < 0:
            raise AnalysisError(f"--shared-samples must be >= 0, got {self.shared_samples}")
        if self.kv_bytes_per_token is not None and self.kv_bytes_per_token <= 0:
            raise AnalysisError(f"--kv-bytes-per-token must be > 0, "
                                f"got {self.kv_bytes_per_token}")
        caps = _positive_sorted(self.lru_caps, "--lru-caps", allow_empty=True)
        if len(caps) > 100:
            raise AnalysisError("--lru-caps: at most 100 capacities")
        return AnalysisSettings(
            block_sizes=(None if self.block_sizes is None
                         else _positive_sorted(self.block_sizes, "--block-sizes")),
            key_mode=self.key_mode, step_union=bool(self.step_union),
            ws_windows=_positive_sorted(self.ws_windows, "--ws-windows"),
            recent_token_windows=_positive_sorted(self.recent_token_windows,
                                                  "--recent-token-windows", allow_empty=True),
            recent_block_windows=_positive_sorted(self.recent_block_windows,
                                                  "--recent-block-windows", allow_empty=True),
            reuse_cap_steps=int(self.reuse_cap_steps), lru_caps=caps,
            max_steps_per_stream=int(self.max_steps_per_stream),
            shared_samples=int(self.shared_samples), tiers=self.tiers,
            kv_bytes_per_token=self.kv_bytes_per_token, sweeps=tuple(self.sweeps))


def _expected_records(tf) -> int | None:
    """Records to expect, for the progress bar: summary.json's count or Parquet metadata."""
    summ = tf.root / "summary.json"
    try:
        if tf.format == "parquet":
            import pyarrow.parquet as pq

            return sum(pq.ParquetFile(f).metadata.num_rows for f in tf.files)
        if summ.is_file():
            return int(json.loads(summ.read_bytes()).get("records"))
    except (OSError, ValueError, TypeError):
        return None
    return None


class Analyzer:
    """The streaming pass; ``feed`` chunks, then ``result``."""

    def __init__(self, settings: AnalysisSettings, meta_config: dict, kern=None) -> None:
        from kvtier.sim.tiers.config import ConfigError, load_tier_config

        self.s = settings
        self.k = kern or kernels()
        try:
            self.tier_cfg = load_tier_config(settings.tiers)
        except ConfigError as exc:
            raise AnalysisError(f"--tiers: {exc}") from None
        self.kvb = int(settings.kv_bytes_per_token or meta_config.get("kv_bytes_per_token")
                       or self.tier_cfg.kv_bytes_per_token)
        self.default_bs = int(((meta_config.get("trace") or {}).get("kv_block_size")) or 0)
        self.builder = ChunkBuilder()
        self.amp = ReadAmplification(self.tier_cfg, self.kvb)
        self.prefix = PrefixOverlap()
        self.tiers = TierBreakdown()
        self.union = StepUnion() if settings.step_union else None
        self.per_layer = settings.key_mode == "request_layer" and not settings.step_union
        self.sizes: dict[int, BlockSizeAnalysis] = {}
        self.first_step = np.zeros(0, dtype=np.int64)
        self.edges = OFFSET_EDGES
        near = np.asarray([w + 1 for w in settings.recent_token_windows], dtype=np.int64)
        self.q_edges = np.unique(np.concatenate([self.edges, near]))
        self.near_idx = np.searchsorted(self.q_edges, near)
        self.bin_idx = np.searchsorted(self.q_edges, self.edges)
        self.offset_hist = np.zeros((0, self.edges.shape[0]), dtype=np.int64)
        self.filter_streams = StreamIndex(settings.key_mode == "request_layer")
        self.filter_ord = StepOrdinals()
        self.analysed = 0
        self.scratch: dict = {}

    def _sizes(self, c: Chunk) -> dict[int, BlockSizeAnalysis]:
        if not self.sizes:
            sizes = self.s.block_sizes or (c.block_size or self.default_bs or 16,)
            self.sizes = {b: BlockSizeAnalysis(b, self.s, self.k, self.per_layer)
                          for b in sizes}
        return self.sizes

    def _decode_steps(self, c: Chunk) -> np.ndarray:
        m = int(c.req.max()) + 1
        if m > self.first_step.shape[0]:
            self.first_step = np.concatenate([self.first_step,
                                              np.full(m - self.first_step.shape[0], -1)])
        new = self.first_step[c.req] < 0
        if new.any():  # a request's first record gives its first decode step
            r, i = np.unique(c.req[new], return_index=True)
            self.first_step[r] = c.step[new][i]
        return np.maximum(c.step - self.first_step[c.req], 0)

    def feed(self, table) -> None:
        c = self.builder.build(table)
        if c is None:
            return
        sizes = self._sizes(c)
        # old traces give prefix.intersection_blocks as a count: the blocks at the recorded
        # size are needed to name them
        rec_bs = c.block_size if (c.block_size and list_values(
            c.table, "prefix.intersection_blocks") is None) else None
        rp = self._pass(c, rec_bs)
        redo = False
        if rp.bad.any():
            self.builder.skipped.invalid += int(rp.bad.sum())
            c = c.take(~rp.bad)
            redo = True
        if c.n and rp.unsorted:
            normalise(c)
            redo = True
        if c.n and self.s.max_steps_per_stream:
            o = self.filter_ord(self.filter_streams(c.req, c.layer), c.step)
            keep = o < self.s.max_steps_per_stream
            if not keep.all():
                self.builder.skipped.max_steps_per_stream += int((~keep).sum())
                c = c.take(keep)
                redo = True
        if c.n == 0:
            return
        if redo:
            rp = self._pass(c, rec_bs)
        self.analysed += c.n
        d = self._decode_steps(c)
        k = c.lens()
        near = k[:, None] - rp.ge[:, self.near_idx]
        self.amp.add(rp.amp, k)
        self._offsets(c.layer, rp.ge)
        recorded = rp.blocks[rec_bs][:2] if rec_bs else None
        self.prefix.add(c, d, rp.below, recorded)
        self.tiers.add(c)
        recs = Records(c.req, c.layer, c.step, c.seq_len, c.offsets, c.pos, c.gidx, near)
        virt = None
        if self.union is not None:
            virt = self.union.feed(c.req, c.step, c.seq_len, c.offsets, c.pos)
        vp = self._pass(virt, None, slot="union") if virt is not None else None
        for bs, a in sizes.items():
            bd = rp.blocks[bs]
            a.trace_records(recs, bd, d)
            if self.union is None:
                a.stream_records(recs, bd)
            elif virt is not None:
                a.stream_records(virt, vp.blocks[bs])

    def _pass(self, r, extra_bs: int | None, slot: str = "real"):
        """``kernels.records_pass`` over records ``r`` at every analysed block size (and
        ``extra_bs``); fills ``r.near`` for virtual records. Block arrays live in a scratch
        per slot, valid until the next pass of that slot."""
        sizes = list(self.sizes)
        if extra_bs and extra_bs not in self.sizes:
            sizes.append(extra_bs)
        cut = self.prefix.cut(r) if slot == "real" else np.zeros(r.n, dtype=np.int64)
        wins = np.asarray(self.s.recent_block_windows, dtype=np.int64)
        rp = self.k.records_pass(r.pos, r.offsets, r.seq_len, self.q_edges, cut, sizes, wins,
                                 self.scratch.setdefault(slot, {}))
        if slot != "real":
            r.near = np.diff(r.offsets)[:, None] - rp.ge[:, self.near_idx]
        return rp

    def _offsets(self, layer: np.ndarray, ge: np.ndarray) -> None:
        g = ge[:, self.bin_idx]
        counts = g.copy()
        counts[:, :-1] -= g[:, 1:]
        m = int(layer.max()) + 1
        if m > self.offset_hist.shape[0]:
            pad = np.zeros((m - self.offset_hist.shape[0], self.edges.shape[0]), np.int64)
            self.offset_hist = np.concatenate([self.offset_hist, pad])
        # per-layer sums as one (layers x records) @ (records x bins) product (exact: counts
        # stay far below 2**53), much faster than np.add.at over rows
        onehot = np.zeros((self.offset_hist.shape[0], layer.shape[0]))
        onehot[layer, np.arange(layer.shape[0])] = 1.0
        self.offset_hist += np.rint(onehot @ counts).astype(np.int64)

    def finish(self) -> None:
        if self.union is not None:
            virt = self.union.flush()
            if virt is not None:
                vp = self._pass(virt, None, slot="union")
                for bs, a in self.sizes.items():
                    a.stream_records(virt, vp.blocks[bs])

    def result(self, meta: dict) -> dict:
        s = self.s
        n_req = len(self.builder.request_ids)
        layers = np.flatnonzero(self.offset_hist.sum(axis=1) > 0).tolist()
        backend = (meta.get("config") or {}).get("backend")
        sweeps = []
        for p in s.sweeps:
            try:
                sweeps.append(sweep_table(p))
            except ValueError as exc:
                raise AnalysisError(str(exc)) from None
        settings = asdict(s)
        settings["block_sizes"] = list(self.sizes)
        return {
            "kvtier_analysis": FORMAT_VERSION,
            "run_name": meta.get("run_name"),
            "dataset": meta.get("dataset"),
            "backend": backend,
            "kernels": self.k.name,
            "records_read": self.builder.records_read,
            "records_analyzed": self.analysed,
            "requests": n_req,
            "layers": len(layers),
            "block_size_recorded": self.builder.block_size,
            "kv_bytes_per_token": self.kvb,
            "settings": settings,
            "results": [a.result(n_req, s.key_mode, s.step_union) for a in self.sizes.values()],
            "read_amplification": self.amp.result(),
            "offsets": {
                "edges_tokens": self.edges.tolist(),
                "layers": layers,
                "counts_by_layer": [self.offset_hist[lv].tolist() for lv in layers],
            },
            "prefix": self.prefix.result(self.builder.block_size),
            "tiers": self.tiers.result(backend),
            "sweeps": sweeps,
        }


def analyze(trace: str | Path, settings: AnalysisSettings | None = None, *,
            progress: bool = False, kern=None) -> dict:
    """Analyse a trace directory (or one trace file); returns the ``analysis.json`` dict.

    Raises ``AnalysisError`` on bad settings, an unreadable trace or a trace with no record
    that can be analysed."""
    t0 = time.perf_counter()
    s = (settings or AnalysisSettings()).check()
    try:
        tf = find_trace(trace)
    except TraceError as exc:
        raise AnalysisError(str(exc)) from None
    meta = {}
    if tf.meta is not None:
        import msgspec

        meta = msgspec.to_builtins(tf.meta)
    an = Analyzer(s, meta.get("config") or {}, kern)
    log = ReadLog()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=_expected_records(tf), unit="rec", desc="analyze")
    try:
        for table in iter_columns(tf, ALL_COLUMNS, log):
            an.feed(table)
            if bar is not None:
                bar.update(table.num_rows)
        an.finish()
    except TraceError as exc:
        raise AnalysisError(str(exc)) from None
    finally:
        if bar is not None:
            bar.close()
    sk = an.builder.skipped
    lines = log.skipped
    if an.analysed == 0:
        first = (lines.examples or log.notes or [""])[0]
        raise AnalysisError(
            f"{trace}: no record could be analysed ({an.builder.records_read} read; lines "
            f"that are not records: {_reasons(lines.by_reason())}; records skipped: "
            f"{_reasons(sk.to_dict())})" + (f"; first problem: {first}" if first else ""))
    warn_skipped(lines, trace, an.builder.records_read)
    out = an.result(meta)
    out["trace"] = str(trace)
    out["format"] = tf.format
    out["skipped"] = {**lines.by_reason(), **sk.to_dict()}
    out["skipped_examples"] = lines.examples + log.notes[:max(0, 5 - len(lines.examples))]
    out["seconds"] = time.perf_counter() - t0
    return out


def _reasons(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items() if v) or "none"


def write_analysis(path: str | Path, res: dict) -> Path:
    """Write an analysis as indented JSON, atomically (a killed run leaves the old file)."""
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path
