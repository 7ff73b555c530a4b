"""The compact binary trace: Parquet (also kvtier's Parquet export).

One row per record with the record's own nesting (structs, lists; ``latency_us``,
``prefix_key``, ``scores_stats`` and ``scores_topk`` nullable, a null ``scores_topk`` meaning
"not stored"). The sorted int lists use DELTA_BINARY_PACKED (consecutive differences of sorted
positions need a few bits each) and everything is zstd-compressed, which makes the file many
times smaller than JSONL. Conversion is lossless both ways: ints stay int64, floats float64.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgspec

from kvtier.schema import TopkRecord, TraceError

BATCH_RECORDS = 2048

_INT_LISTS = ("selected_block_ids", "selected_token_pos")


def arrow_schema():
    """The Arrow schema of a record (field order = the JSONL field order)."""
    import pyarrow as pa

    i64, f64 = pa.int64(), pa.float64()
    tier = pa.struct([
        pa.field("hit_blocks", i64, nullable=False), pa.field("bytes_read", i64, nullable=False),
        pa.field("read_ops", i64, nullable=False), pa.field("latency_us", f64),
        pa.field("batch_size", i64, nullable=False),
    ])
    return pa.schema([
        pa.field("event", pa.string(), nullable=False),
        pa.field("run_name", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("rank", i64, nullable=False),
        pa.field("world_size", i64, nullable=False),
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("layer_id", i64, nullable=False),
        pa.field("step_idx", i64, nullable=False),
        pa.field("seq_len_current", i64, nullable=False),
        pa.field("unique_token_pos_count", i64, nullable=False),
        pa.field("offset_min", i64, nullable=False),
        pa.field("offset_p50", f64, nullable=False),
        pa.field("offset_max", i64, nullable=False),
        pa.field("block_size_tokens", i64, nullable=False),
        pa.field("selected_block_ids", pa.list_(pa.field("element", i64, nullable=False)), nullable=False),
        pa.field("unique_blocks", i64, nullable=False),
        pa.field("tokens_per_touched_block", pa.struct([
            pa.field("mean", f64, nullable=False), pa.field("p50", f64, nullable=False),
            pa.field("p95", f64, nullable=False)]), nullable=False),
        pa.field("kv_fetch", pa.struct([
            pa.field("hbm", tier, nullable=False), pa.field("local_pool", tier, nullable=False),
            pa.field("remote_pool", tier, nullable=False)]), nullable=False),
        pa.field("prefix", pa.struct([
            pa.field("prefix_cache_hit", pa.bool_(), nullable=False),
            pa.field("prefix_cached_blocks", i64, nullable=False),
            pa.field("prefix_key", pa.string()),
            pa.field("intersection_ratio", f64, nullable=False),
            pa.field("intersection_blocks", i64, nullable=False)]), nullable=False),
        pa.field("selected_token_pos", pa.list_(pa.field("element", i64, nullable=False)), nullable=False),
        pa.field("scores_stats", pa.struct([
            pa.field("min", f64, nullable=False), pa.field("mean", f64, nullable=False),
            pa.field("max", f64, nullable=False)])),
        pa.field("scores_topk", pa.list_(pa.field("element", f64, nullable=False))),
    ])


def _to_row(rec: TopkRecord) -> dict:
    row = msgspec.to_builtins(rec)
    row.setdefault("scores_topk", None)
    return row


class ParquetTraceWriter:
    """Streams records into one Parquet file in row groups of ``BATCH_RECORDS``."""

    def __init__(self, path: str | Path) -> None:
        import pyarrow.parquet as pq

        self.path = Path(path)
        self.schema = arrow_schema()
        int_cols = [f"{c}.list.element" for c in _INT_LISTS]
        dict_cols = [f.name for f in self.schema if f.name in ("event", "run_name", "dataset", "request_id")]
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


def iter_parquet_records(path: str | Path) -> Iterator[tuple[int, TopkRecord | Exception]]:
    """(1-based row, record) for every row; a row that does not fit the schema yields the
    ValidationError (its message names the field) instead of a record."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise TraceError(f"{path}: not a readable Parquet file: {exc}") from None
    row = 0
    for batch in pf.iter_batches(batch_size=BATCH_RECORDS):
        for item in batch.to_pylist():
            row += 1
            if item.get("scores_topk", 0) is None:
                del item["scores_topk"]
            try:
                yield row, msgspec.convert(item, TopkRecord)
            except msgspec.ValidationError as exc:
                yield row, exc


def read_parquet_table(path: str | Path, fields: list[str] | None = None):
    """A Parquet trace file as an Arrow table in the record's nested schema (``arrow_schema``),
    all fields or the top-level ``fields`` named (other producers' files holding only those
    columns, in narrower int types, are read too); ``TraceError`` naming the file and the
    column when it is unreadable, lacks a field or holds nulls where the record has none."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = arrow_schema()
    names = schema.names if fields is None else list(fields)
    try:
        present = pq.read_schema(path).names
    except (OSError, pa.ArrowException) as exc:
        raise TraceError(f"{path}: not a readable Parquet file: {exc}") from None
    missing = [n for n in names if n not in present]
    if missing:
        raise TraceError(f"{path}: missing column(s) {missing}")
    try:
        table = pq.read_table(path, columns=names)
    except (OSError, pa.ArrowException) as exc:
        raise TraceError(f"{path}: not a readable Parquet file: {exc}") from None
    want = pa.schema([schema.field(n) for n in names])
    try:
        table = table.select(names).cast(want)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise TraceError(f"{path}: columns do not fit the record schema: {exc}") from None
    for f in want:
        if not f.nullable and table.column(f.name).null_count:
            raise TraceError(f"{path}: column `{f.name}` has nulls")
    return table
