"""Traces of kvtier's earlier record form (``schema_version`` 1) and their upgrade.

Until schema 2 kvtier wrote ``request_id`` as the dataset's string id, each tier's
``kv_fetch.<tier>.hit_blocks`` and ``prefix.intersection_blocks`` as counts, and
``kv_fetch.<tier>.batch_size`` as the number of requests decoded together. The design note
(§5.2) has an integer ``request_id``, block-id lists and ``batch_size`` = the blocks of the
tier's batch_get. ``describe`` recognises the old form in a record (so readers can say so in
one line instead of a schema error); ``Upgrader`` rewrites old records into the new form.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from kvtier.schema import TIER_NAMES


def old_form_fields(obj: object) -> list[str]:
    """The fields of a decoded JSON record (a dict) that have the earlier form."""
    if not isinstance(obj, dict):
        return []
    out = []
    if isinstance(obj.get("request_id"), str):
        out.append("request_id (a string)")
    kv = obj.get("kv_fetch")
    if isinstance(kv, dict) and any(isinstance((kv.get(t) or {}).get("hit_blocks"), int)
                                    for t in TIER_NAMES):
        out.append("kv_fetch.<tier>.hit_blocks (a count)")
        out.append("kv_fetch.<tier>.batch_size (requests in the batch)")
    pre = obj.get("prefix")
    if isinstance(pre, dict) and isinstance(pre.get("intersection_blocks"), int):
        out.append("prefix.intersection_blocks (a count)")
    return out


def upgrade_hint(where: str | Path) -> str:
    return f"upgrade it with `kvtier convert --upgrade {where} OUT_DIR`"


def message(where: str | Path, fields: list[str]) -> str:
    """The one line readers print for a trace of the earlier form."""
    return (f"{where}: written in kvtier's earlier trace format (schema 1): "
            f"{', '.join(fields)} instead of the design note's int request_id, block-id lists "
            f"and batch_size = blocks per batch_get; {upgrade_hint(where)}")


def describe(line: bytes | str, where: str | Path) -> str | None:
    """``message`` for a JSONL line of the earlier form, else None."""
    try:
        obj = msgspec.json.decode(line)
    except msgspec.DecodeError:
        return None
    fields = old_form_fields(obj)
    return message(where, fields) if fields else None


def describe_parquet_schema(schema, where: str | Path) -> str | None:
    """``message`` for a Parquet file whose columns have the earlier form, else None."""
    import pyarrow as pa

    fields = []
    names = schema.names
    if "request_id" in names and pa.types.is_string(schema.field("request_id").type):
        fields.append("request_id (a string)")
    if "kv_fetch" in names:
        hbm = schema.field("kv_fetch").type.field("hbm").type
        if pa.types.is_integer(hbm.field("hit_blocks").type):
            fields += ["kv_fetch.<tier>.hit_blocks (a count)",
                       "kv_fetch.<tier>.batch_size (requests in the batch)"]
    if "prefix" in names:
        if pa.types.is_integer(schema.field("prefix").type.field("intersection_blocks").type):
            fields.append("prefix.intersection_blocks (a count)")
    return message(where, fields) if fields else None


class UpgradeError(ValueError):
    """An old record that cannot be upgraded exactly (the message says why)."""


class Upgrader:
    """Rewrites records of the earlier form, in trace order.

    - ``request_id``: string ids are numbered 0, 1, 2, ... by first appearance, which is the
      admission order of kvtier's runners (``names`` keeps the old strings for
      ``requests.jsonl``); int ids are kept.
    - ``kv_fetch``: an HBM-only record (every block an HBM hit, the pools empty) gets
      ``hbm.hit_blocks = selected_block_ids``, the pools ``[]`` and each ``batch_size`` =
      its list's length. A record whose pools served blocks cannot be upgraded: the old
      form kept only counts, so which blocks each pool served is unknown (replay the
      upgraded HBM trace again instead).
    - ``prefix.intersection_blocks``: the first ``k`` of ``selected_block_ids`` (prefix
      blocks are ids 0 .. n-1, so the touched ones lead the sorted list).
    A record already in the new form passes unchanged.
    """

    def __init__(self) -> None:
        self.names: dict[str, int] = {}

    def __call__(self, obj: dict, where: str) -> dict:
        rid = obj.get("request_id")
        if isinstance(rid, str):
            obj["request_id"] = self.names.setdefault(rid, len(self.names))
        blocks = obj.get("selected_block_ids")
        kv = obj.get("kv_fetch")
        if isinstance(kv, dict) and isinstance(blocks, list):
            tiers = [kv.get(t) for t in TIER_NAMES]
            if all(isinstance(t, dict) and isinstance(t.get("hit_blocks"), int) for t in tiers):
                hbm, local, remote = tiers
                if local["hit_blocks"] or remote["hit_blocks"] or hbm["hit_blocks"] != len(blocks):
                    raise UpgradeError(
                        f"{where}: kv_fetch of a tiered replay (hbm {hbm['hit_blocks']}, "
                        f"local_pool {local['hit_blocks']}, remote_pool {remote['hit_blocks']} "
                        f"blocks of {len(blocks)}): the earlier format did not record which "
                        "blocks each tier served; upgrade the trace that was replayed and "
                        "run kvtier replay on it again")
                hbm["hit_blocks"] = list(blocks)
                local["hit_blocks"], remote["hit_blocks"] = [], []
                for t in tiers:
                    t["batch_size"] = len(t["hit_blocks"])
        pre = obj.get("prefix")
        if isinstance(pre, dict) and isinstance(pre.get("intersection_blocks"), int) \
                and isinstance(blocks, list):
            pre["intersection_blocks"] = list(blocks[:pre["intersection_blocks"]])
        return obj
