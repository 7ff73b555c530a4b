"""The compact binary trace: Parquet (also kvtier's Parquet export).

One row per record with the record's own nesting (structs, lists; ``latency_us``,
``prefix_key``, ``scores_stats`` and ``scores_topk`` nullable, a null ``scores_topk`` meaning
"not stored"). The sorted int lists use DELTA_BINARY_PACKED (consecutive differences of sorted
ids need a few bits each) and everything is zstd-compressed, which makes the file many times
smaller than JSONL.

One list is stored derived: ``kv_fetch.hbm.hit_blocks`` is null in the file when it equals
what the partition implies, ``selected_block_ids`` minus both pools' ``hit_blocks`` (always
so for a valid trace; with the HBM-only backend it is ``selected_block_ids`` itself). A
record whose lists do not partition its blocks keeps its own list, so conversion is lossless
both ways for any record: ints stay int64, floats float64. Readers (``iter_parquet_records``,
``read_parquet_flat``) hand out the materialised list.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgspec
import numpy as np

from kvtier.schema import TIER_NAMES, TopkRecord, TraceError
from kvtier.trace import legacy
from kvtier.trace.arrays import as_numpy
from kvtier.trace.arrays import list_parts as _list_parts

BATCH_RECORDS = 2048

_INT_LISTS = ("selected_block_ids", "selected_token_pos", "prefix.intersection_blocks",
              *(f"kv_fetch.{t}.hit_blocks" for t in TIER_NAMES))
_POOLS = ("local_pool", "remote_pool")


def arrow_schema(derived_hbm: bool = False):
    """The Arrow schema of a record (field order = the JSONL field order). With
    ``derived_hbm`` it is the file's schema, where ``kv_fetch.hbm.hit_blocks`` is nullable
    (null: the blocks no pool served)."""
    import pyarrow as pa

    i64, f64 = pa.int64(), pa.float64()
    ints = pa.list_(pa.field("element", i64, nullable=False))

    def tier(nullable_hits: bool):
        return pa.struct([
            pa.field("hit_blocks", ints, nullable=nullable_hits),
            pa.field("bytes_read", i64, nullable=False),
            pa.field("read_ops", i64, nullable=False), pa.field("latency_us", f64),
            pa.field("batch_size", i64, nullable=False),
        ])

    return pa.schema([
        pa.field("event", pa.string(), nullable=False),
        pa.field("run_name", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("rank", i64, nullable=False),
        pa.field("world_size", i64, nullable=False),
        pa.field("request_id", i64, nullable=False),
        pa.field("layer_id", i64, nullable=False),
        pa.field("step_idx", i64, nullable=False),
        pa.field("seq_len_current", i64, nullable=False),
        pa.field("unique_token_pos_count", i64, nullable=False),
        pa.field("offset_min", i64, nullable=False),
        pa.field("offset_p50", f64, nullable=False),
        pa.field("offset_max", i64, nullable=False),
        pa.field("block_size_tokens", i64, nullable=False),
        pa.field("selected_block_ids", ints, nullable=False),
        pa.field("unique_blocks", i64, nullable=False),
        pa.field("tokens_per_touched_block", pa.struct([
            pa.field("mean", f64, nullable=False), pa.field("p50", f64, nullable=False),
            pa.field("p95", f64, nullable=False)]), nullable=False),
        pa.field("kv_fetch", pa.struct([
            pa.field("hbm", tier(derived_hbm), nullable=False),
            pa.field("local_pool", tier(False), nullable=False),
            pa.field("remote_pool", tier(False), nullable=False)]), nullable=False),
        pa.field("prefix", pa.struct([
            pa.field("prefix_cache_hit", pa.bool_(), nullable=False),
            pa.field("prefix_cached_blocks", i64, nullable=False),
            pa.field("prefix_key", pa.string()),
            pa.field("intersection_ratio", f64, nullable=False),
            pa.field("intersection_blocks", ints, nullable=False)]), nullable=False),
        pa.field("selected_token_pos", ints, nullable=False),
        pa.field("scores_stats", pa.struct([
            pa.field("min", f64, nullable=False), pa.field("mean", f64, nullable=False),
            pa.field("max", f64, nullable=False)])),
        pa.field("scores_topk", pa.list_(pa.field("element", f64, nullable=False))),
    ])


def _implied_hbm(selected: list[int], local: list[int], remote: list[int]) -> list[int]:
    if not local and not remote:
        return selected
    pooled = set(local) | set(remote)
    return [b for b in selected if b not in pooled]


def _to_row(rec: TopkRecord) -> dict:
    row = msgspec.to_builtins(rec)
    row.setdefault("scores_topk", None)
    kv = row["kv_fetch"]
    hbm = kv["hbm"]
    if hbm["hit_blocks"] == _implied_hbm(row["selected_block_ids"], kv["local_pool"]["hit_blocks"],
                                         kv["remote_pool"]["hit_blocks"]):
        hbm["hit_blocks"] = None  # derived on read
    return row


class ParquetTraceWriter:
    """Streams records into one Parquet file in row groups of ``BATCH_RECORDS``."""

    def __init__(self, path: str | Path) -> None:
        import pyarrow.parquet as pq

        self.path = Path(path)
        self.schema = arrow_schema(derived_hbm=True)
        int_cols = [f"{c}.list.element" for c in _INT_LISTS]
        dict_cols = [f.name for f in self.schema if f.name in ("event", "run_name", "dataset")]
        self._writer = pq.ParquetWriter(
            self.path, self.schema, compression="zstd", compression_level=3,
            use_dictionary=dict_cols, column_encoding={c: "DELTA_BINARY_PACKED" for c in int_cols},
            write_statistics=False,
        )
        self._rows: list[dict] = []
        self.records = 0

    def write(self, rec: TopkRecord) -> None:
        self._rows.append(_to_row(rec))
        if len(self._rows) >= BATCH_RECORDS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self.schema))
            self.records += len(self._rows)
            self._rows = []

    def close(self) -> None:
        self._flush()
        self._writer.close()


def _open(path: str | Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise TraceError(f"{path}: not a readable Parquet file: {exc}") from None


def iter_parquet_records(path: str | Path) -> Iterator[tuple[int, TopkRecord | Exception]]:
    """(1-based row, record) for every row; a row that does not fit the schema yields the
    ValidationError (its message names the field) instead of a record."""
    pf = _open(path)
    old = legacy.describe_parquet_schema(pf.schema_arrow, path)
    if old is not None:
        raise TraceError(old)
    row = 0
    for batch in pf.iter_batches(batch_size=BATCH_RECORDS):
        for item in batch.to_pylist():
            row += 1
            if item.get("scores_topk", 0) is None:
                del item["scores_topk"]
            try:
                kv = item["kv_fetch"]
                if kv["hbm"]["hit_blocks"] is None:
                    kv["hbm"]["hit_blocks"] = _implied_hbm(
                        item["selected_block_ids"], kv["local_pool"]["hit_blocks"] or [],
                        kv["remote_pool"]["hit_blocks"] or [])
            except (KeyError, TypeError):
                pass  # msgspec names what is missing
            try:
                yield row, msgspec.convert(item, TopkRecord)
            except msgspec.ValidationError as exc:
                yield row, exc


def materialise_hbm(flat):
    """A flat (dotted) table whose ``kv_fetch.hbm.hit_blocks`` has nulls (the file's derived
    form) with those rows filled in: ``selected_block_ids`` minus both pools' lists."""
    import pyarrow as pa

    name = "kv_fetch.hbm.hit_blocks"
    col = flat.column(name).combine_chunks()
    if not col.null_count:
        return flat
    n = len(col)
    sel_o, sel_v = _list_parts(flat.column("selected_block_ids").combine_chunks())
    rec = np.repeat(np.arange(n, dtype=np.int64), np.diff(sel_o))
    keep = np.ones(len(sel_v), dtype=bool)
    for pool in _POOLS:
        po, pv = _list_parts(flat.column(f"kv_fetch.{pool}.hit_blocks").combine_chunks())
        if len(pv):
            prec = np.repeat(np.arange(n, dtype=np.int64), np.diff(po))
            base = int(max(sel_v.max(initial=0), pv.max(initial=0))) + 1
            keep &= ~np.isin(rec * base + sel_v, prec * base + pv)
    derived_len = np.bincount(rec[keep], minlength=n)
    own_o, own_v = _list_parts(col)
    is_null = ~as_numpy(col.is_valid())
    lens = np.where(is_null, derived_len, np.diff(own_o))
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(lens, out=offsets[1:])
    # values: per record either its own list or the derived one, in record order
    own_rec = np.repeat(np.arange(n, dtype=np.int64), np.diff(own_o))
    parts_v = np.concatenate([own_v[~is_null[own_rec]], sel_v[keep & is_null[rec]]])
    parts_r = np.concatenate([own_rec[~is_null[own_rec]], rec[keep & is_null[rec]]])
    values = parts_v[np.argsort(parts_r, kind="stable")]
    field = flat.schema.field(name).with_nullable(False)
    arr = pa.ListArray.from_arrays(pa.array(offsets, pa.int32() if offsets[-1] < 2**31 else pa.int64()),
                                   pa.array(values, pa.int64()))
    if offsets[-1] >= 2**31:
        arr = pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), pa.array(values, pa.int64()))
    arr = arr.cast(field.type)
    return flat.set_column(flat.schema.get_field_index(name), field, arr)


def flat_fields(schema, prefix: str = "", nullable: bool = False) -> list:
    """Leaf fields of a (record) schema with dotted names; a leaf under a nullable struct is
    nullable."""
    import pyarrow as pa

    out = []
    for f in schema:
        name = prefix + f.name
        if pa.types.is_struct(f.type):
            out.extend(flat_fields(f.type, name + ".", nullable or f.nullable))
        else:
            out.append(f.with_name(name).with_nullable(nullable or f.nullable))
    return out


def flatten(table):
    """A nested record table with its structs flattened to dotted column names."""
    import pyarrow as pa

    while any(pa.types.is_struct(t) for t in table.schema.types):
        table = table.flatten()
    return table


def read_parquet_flat(path: str | Path, columns: list[str] | None = None):
    """A Parquet trace file as a flat table (dotted names, ``kv_fetch.hbm.hit_blocks``
    materialised), all columns or the flat ``columns`` named; reads only the top-level
    fields those need. ``TraceError`` names the file and column of anything that does not
    fit the record schema (a missing field, a wrong type, a null where none may be)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = arrow_schema(derived_hbm=True)
    logical = {f.name: f for f in flat_fields(arrow_schema())}
    want = list(logical) if columns is None else list(columns)
    top = list(dict.fromkeys(c.split(".")[0] for c in want))
    if "kv_fetch.hbm.hit_blocks" in want and "selected_block_ids" not in top:
        top.append("selected_block_ids")
    file_schema = _open(path).schema_arrow
    old = legacy.describe_parquet_schema(file_schema, path)
    if old is not None:
        raise TraceError(old)
    present = file_schema.names
    missing = [n for n in top if n not in present]
    if missing:
        raise TraceError(f"{path}: missing column(s) {missing}")
    try:
        table = pq.read_table(path, columns=top)
        table = table.select(top).cast(pa.schema([schema.field(n) for n in top]))
    except (OSError, pa.ArrowException) as exc:
        raise TraceError(f"{path}: columns do not fit the record schema: {exc}") from None
    flat = flatten(table)
    if "kv_fetch.hbm.hit_blocks" in want:
        flat = materialise_hbm(flat)
    flat = flat.select([c for c in flat.column_names if c in logical and (
        c in want or c == "selected_block_ids" or not c.startswith("kv_fetch.hbm.hit"))])
    for name in flat.column_names:
        if not logical[name].nullable and flat.column(name).null_count:
            raise TraceError(f"{path}: column `{name}` has nulls")
    flat = flat.select(want)
    return flat.cast(pa.schema([logical[n] for n in want]))
