"""The bytes of one ``dsa_topk`` record: one layout, in two forms for the two record writers.

``LAYOUT`` is the record's JSON text in schema field order, as (literal before the field, field
kind, the field's %-code in the numpy path's template). The numba kernel
(``step_numba.emit_records``) runs it as a program (``FAST_LITS`` / ``FAST_LIT_STARTS`` /
``FAST_KINDS``); the numpy path formats it as bytes templates cut at the list fields
(``SEGMENTS``). Both therefore write the same bytes (tests/test_tracer_fast.py compares them).

Int lists are space-padded fixed-width elements (``kvtier.trace.intlist_json``); a block-id list
(LST) comes without its ']' (the next literal starts with it), so empty lists need no special
case. Floats are written with repr (the shortest round-trip form, as msgspec does).
"""

from __future__ import annotations

import numpy as np

from kvtier.schema import EVENT_DSA_TOPK, record_encoder
from kvtier.trace import step_numba
from kvtier.trace.intlist_json import MAX_VALUE

_K = step_numba
_TIER_FIELDS = [(b'],"bytes_read":', _K.INT, b"%d"), (b',"read_ops":', _K.INT, b"%d"),
                (b',"latency_us":', _K.TEXT, b"%s"), (b',"batch_size":', _K.INT, b"%d")]
LAYOUT = [
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
#: the end of a record without scores (with scores the writers append ``scores_stats`` text)
CLOSE = b',"scores_stats":null}\n'
#: column of each field in the program (the kernel's ``vals`` / the template's arguments)
FIELD = {name: i for i, name in enumerate([
    "head", "layer", "step", "seq", "n_tok", "off_min", "off_p50", "off_max", "bs", "blocks",
    "unique", "tpb_mean", "tpb_p50", "tpb_p95",
    "hbm", "hbm_bytes", "hbm_ops", "hbm_lat", "hbm_batch",
    "local", "local_bytes", "local_ops", "local_lat", "local_batch",
    "remote", "remote_bytes", "remote_ops", "remote_lat", "remote_batch",
    "hit", "cached", "key", "ratio", "inter", "pos"])}
assert len(FIELD) == len(LAYOUT)


def _segments() -> list[bytes]:
    """The numpy path's per-record templates: ``LAYOUT`` cut at every list field, so a
    record is ``seg[0] % (...)``, list, ``seg[1] % (...)``, list, ..., the positions, the
    tail; the lists are written as they are (``writev``), never copied into the text."""
    segs, cur = [], b""
    for lit, kind, code in LAYOUT:
        if kind in (_K.LST, _K.POS):
            segs.append(cur + lit)
            cur = b""
        else:
            cur += lit + code
    return segs


SEGMENTS = _segments()
assert len(SEGMENTS) == 6  # before: blocks, hbm, local_pool, remote_pool, intersection, positions


def _fast_program() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``LAYOUT`` for ``step_numba.emit_records``: (literal bytes, literal starts, kinds)."""
    lits = [lit for lit, _kind, _code in LAYOUT] + [CLOSE]
    starts = np.zeros(len(lits) + 1, np.int64)
    np.cumsum([len(x) for x in lits], out=starts[1:])
    return (np.frombuffer(b"".join(lits) + bytes(8), np.uint8), starts,
            np.array([kind for _lit, kind, _code in LAYOUT], np.int64))


FAST_LITS, FAST_LIT_STARTS, FAST_KINDS = _fast_program()


def record_head(run_name: str, dataset: str, rank: int, world_size: int) -> bytes:
    """A record's text up to the value of its ``request_id`` (the same for the whole run);
    the request id follows, then ``LAYOUT``."""
    enc = record_encoder()
    return (b'{"event":"' + EVENT_DSA_TOPK.encode() + b'","run_name":' + enc.encode(run_name)
            + b',"dataset":' + enc.encode(dataset)
            + b',"rank":%d,"world_size":%d,"request_id":' % (rank, world_size))


def list_width(vmax: int) -> int:
    """Element width ``kvtier.trace.intlist_json`` uses for lists whose largest value is
    ``vmax`` (0: the compact fallback past ``MAX_VALUE``)."""
    return 0 if vmax > MAX_VALUE else len(str(vmax)) + 1


def digit_table(width: int) -> np.ndarray:
    """The kernel's digit table for list width ``width`` (a dummy for compact lists)."""
    return step_numba.digit_table(width, 10 ** (width - 1)) if width else np.zeros(1, np.uint64)
