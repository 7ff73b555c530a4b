"""``kvtier convert``: a trace directory from JSONL to Parquet or back, losslessly; with
``upgrade`` a trace of kvtier's earlier form (schema 1) into the design note's (schema 2)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import msgspec

from kvtier.schema import (
    META_FILE,
    PARQUET_FILE,
    REQUESTS_FILE,
    SCHEMA_VERSION,
    SUMMARY_FILE,
    TRACE_FILE,
    TopkRecord,
    TraceError,
    TraceMeta,
)
from kvtier.trace.legacy import UpgradeError, Upgrader
from kvtier.trace.parquet import ParquetTraceWriter
from kvtier.trace.reader import TraceFiles, find_trace, iter_jsonl_lines, iter_records, location_of
from kvtier.trace.writer import RequestLog, prepare_out_dir, write_json_atomic


def _upgraded_records(tf: TraceFiles, up: Upgrader) -> Iterator[TopkRecord]:
    """The records of a trace of either form, upgraded to the current one (``Upgrader``),
    checked against the schema; errors name file and line (or row) and field."""
    if tf.format == "parquet":
        import pyarrow.parquet as pq

        for path in tf.files:
            row = 0
            for batch in pq.ParquetFile(path).iter_batches(batch_size=2048):
                for obj in batch.to_pylist():
                    row += 1
                    if obj.get("scores_topk", 0) is None:
                        del obj["scores_topk"]
                    yield _checked(up(obj, f"{path}:row {row}"), f"{path}:row {row}")
        return
    for path in tf.files:
        for lineno, line, complete in iter_jsonl_lines(path):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            if not complete:
                raise TraceError(f"{where}: truncated final line (no newline); "
                                 "the records before it are intact")
            try:
                obj = msgspec.json.decode(line)
            except msgspec.DecodeError as exc:
                raise TraceError(f"{where}: malformed JSON: {exc}") from None
            yield _checked(up(obj, where), where)


def _checked(obj: dict, where: str) -> TopkRecord:
    try:
        return msgspec.convert(obj, TopkRecord)
    except msgspec.ValidationError as exc:
        field, msg = location_of(exc)
        raise TraceError(f"{where}: {field}: {msg}") from None


def convert_trace(src: str | Path, dst: str | Path, to: str | None = None, force: bool = False,
                  progress: bool = False, upgrade: bool = False) -> tuple[str, int]:
    """Convert a trace (directory or file) into directory ``dst`` in format ``to`` (default:
    the other format; with ``upgrade``, the input's). Returns (format, records). The input is
    read fully before the output is committed, so a bad record leaves no half-written output
    behind. ``upgrade`` also rewrites records of kvtier's earlier form (see
    ``kvtier.trace.legacy.Upgrader``), writes ``requests.jsonl`` mapping the new integer ids
    to the old string ids when the input has none, and sets ``schema_version``."""
    tf = find_trace(src)
    fmt = to or (tf.format if upgrade else ("jsonl" if tf.format == "parquet" else "parquet"))
    if fmt not in ("jsonl", "parquet"):
        raise ValueError(f"--to must be jsonl or parquet, got {fmt!r}")
    out = Path(dst)
    if out.resolve() == tf.root.resolve():
        raise ValueError("output directory must differ from the input's")
    prepare_out_dir(out, force)
    name = PARQUET_FILE if fmt == "parquet" else TRACE_FILE
    tmp = out / (name + ".partial")
    up = Upgrader() if upgrade else None
    records = _upgraded_records(tf, up) if up is not None else iter_records(tf)
    if progress:
        from tqdm import tqdm

        records = tqdm(records, desc="convert", unit="rec", disable=None)  # None: not on a pipe
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
    except (UpgradeError, TraceError) as exc:
        tmp.unlink(missing_ok=True)
        raise TraceError(str(exc)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.rename(out / name)
    meta = tf.meta or TraceMeta(schema_version=SCHEMA_VERSION, run_name="", dataset="", config={})
    meta.format = fmt
    meta.shards = [name]
    if upgrade:
        meta.schema_version = SCHEMA_VERSION
    if tf.meta is not None:
        write_json_atomic(out / META_FILE, meta)
    if (tf.root / REQUESTS_FILE).is_file():
        shutil.copyfile(tf.root / REQUESTS_FILE, out / REQUESTS_FILE)
    elif up is not None and up.names:
        log = RequestLog(out)
        log.write([{"request_id": i, "sample_id": s} for s, i in up.names.items()])
        log.close()
    if (tf.root / SUMMARY_FILE).is_file():
        if up is None:
            shutil.copyfile(tf.root / SUMMARY_FILE, out / SUMMARY_FILE)
        elif tf.meta is not None:
            _upgrade_summary(tf.root / SUMMARY_FILE, out, up)
    return fmt, n


def _upgrade_summary(path: Path, out: Path, up: Upgrader) -> None:
    """The upgraded trace's summary: the recomputable part from its records, the optional
    sections (serving, skipped, backend sections) from the old summary, with per-request
    keys mapped to the new integer ids."""
    from kvtier.trace.summary import BACKEND_SECTIONS, recompute_summary

    old = msgspec.json.decode(path.read_bytes())
    summary = recompute_summary(out)
    ids = {name: str(i) for name, i in up.names.items()}
    for key in ("serving", "skipped", *BACKEND_SECTIONS):
        value = old.get(key)
        if key == "fetch_vs_recompute" and isinstance(value, dict) \
                and isinstance(value.get("per_request"), dict):
            value["per_request"] = {ids.get(k, k): v for k, v in value["per_request"].items()}
        if value is not None:
            field = {f.name: f.type for f in msgspec.structs.fields(type(summary))}[key]
            setattr(summary, key, msgspec.convert(value, field))
    write_json_atomic(out / SUMMARY_FILE, summary)
