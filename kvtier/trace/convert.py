"""``kvtier convert``: a trace directory from JSONL to Parquet or back, losslessly."""

from __future__ import annotations

import shutil
from pathlib import Path

import msgspec

from kvtier.schema import META_FILE, PARQUET_FILE, SUMMARY_FILE, TRACE_FILE, TraceMeta
from kvtier.trace.parquet import ParquetTraceWriter
from kvtier.trace.reader import find_trace, iter_records
from kvtier.trace.writer import prepare_out_dir, write_json_atomic


def convert_trace(src: str | Path, dst: str | Path, to: str | None = None, force: bool = False,
                  progress: bool = False) -> tuple[str, int]:
    """Convert a trace (directory or file) into directory ``dst`` in format ``to``
    (default: the other format). Returns (format, records). The input is read fully before
    the output is committed, so a bad record leaves no half-written output behind."""

    tf = find_trace(src)
    fmt = to or ("jsonl" if tf.format == "parquet" else "parquet")
    if fmt not in ("jsonl", "parquet"):
        raise ValueError(f"--to must be jsonl or parquet, got {fmt!r}")
    out = Path(dst)
    if out.resolve() == tf.root.resolve():
        raise ValueError("output directory must differ from the input's")
    prepare_out_dir(out, force)
    name = PARQUET_FILE if fmt == "parquet" else TRACE_FILE
    tmp = out / (name + ".partial")
    records = iter_records(tf)
    if progress:
        from tqdm import tqdm

        records = tqdm(records, desc="convert", unit="rec")
    n = 0
    try:
        if fmt == "parquet":
            writer = ParquetTraceWriter(tmp)
            try:
                for rec in records:
                    writer.write(rec)
                    n += 1
            finally:
                writer.close()
        else:
            enc = msgspec.json.Encoder()
            buf = bytearray()
            with open(tmp, "wb") as fh:
                for rec in records:
                    enc.encode_into(rec, buf, -1)
                    buf += b"\n"
                    n += 1
                    if len(buf) > 1 << 22:
                        fh.write(buf)
                        buf.clear()
                fh.write(buf)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.rename(out / name)
    meta = tf.meta or TraceMeta(schema_version=1, run_name="", dataset="", config={})
    meta.format = fmt
    meta.shards = [name]
    if tf.meta is not None:
        write_json_atomic(out / META_FILE, meta)
    if (tf.root / SUMMARY_FILE).is_file():
        shutil.copyfile(tf.root / SUMMARY_FILE, out / SUMMARY_FILE)
    return fmt, n
