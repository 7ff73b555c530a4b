"""Tier configuration: what each KV tier costs, loaded from TOML or JSON and checked at start.

Validation is msgspec's (``forbid_unknown_fields``), so a misspelt or out-of-range field fails
before any replay work, naming the field (``$.remote_pool.read_bw_gb_s``). Presets live in
``kvtier/sim/tiers/presets/<name>.toml`` and are addressed by name (``memfabric``, ``mooncake``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import msgspec

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: TOML needs tomli; JSON configs always work
    tomllib = None

PRESET_DIR = Path(__file__).resolve().parent / "presets"

POOL_TIERS = ("local_pool", "remote_pool")

#: How a tier moves rows into HBM (kv_tiers.md §8); decides how read ops are counted.
TransferMethod = Literal["hbm", "per_row_dma", "cpu_gather_dma", "uva_gather", "rdma_sg"]

Pos = Annotated[float, msgspec.Meta(gt=0)]
NonNeg = Annotated[float, msgspec.Meta(ge=0)]
PosInt = Annotated[int, msgspec.Meta(gt=0)]
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]


class ConfigError(ValueError):
    """An invalid tier config; the message names the file and the field."""


class TierSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One tier's capacity and cost: ``t = base + hops*per_hop + ceil(ops/max_batch)*per_op + bytes/bw``.

    ``capacity_bytes`` is per node; the tier holds ``capacity_bytes * nodes``.
    ``slice_bytes`` cuts each contiguous segment into transfer slices (Mooncake's 64 KB);
    ``None`` means one op per segment.
    """

    capacity_bytes: NonNegInt
    read_bw_gb_s: Pos
    write_bw_gb_s: Pos
    base_latency_us: NonNeg
    per_op_us: NonNeg
    max_batch: PosInt
    slice_bytes: PosInt | None = None
    link: str
    method: TransferMethod
    nodes: PosInt = 1
    hops: NonNegInt = 0
    per_hop_latency_us: NonNeg = 0.0

    @property
    def total_capacity_bytes(self) -> int:
        return self.capacity_bytes * self.nodes

    @property
    def latency_us(self) -> float:
        """Fixed part of every batch: base latency plus the network hops."""
        return self.base_latency_us + self.hops * self.per_hop_latency_us


class LinkSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A shared transfer path (a PCIe direction pair, a NIC). Transfers of every tier on the
    link queue for its ``channels``; a ``duplex`` link has separate read and write queues."""

    channels: PosInt = 1
    duplex: bool = True


class RecomputeSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """GPU throughput used to price recomputing a prefix instead of fetching it."""

    gpu_tflops: Pos = 989.0
    mfu: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.5
    max_prefix_tokens: PosInt = 1_048_576


class TierConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The whole tier model: HBM plus optional local and remote pools and their links."""

    name: str = "custom"
    kv_bytes_per_token: PosInt = 656
    block_size: PosInt = 64
    write_policy: Literal["write_through", "write_back"] = "write_through"
    fetch_granularity: PosInt | None = None
    layer_compute_us: NonNeg = 0.0
    on_release: Literal["drop", "keep"] = "drop"
    hbm: TierSpec
    local_pool: TierSpec | None = None
    remote_pool: TierSpec | None = None
    links: dict[str, LinkSpec] = {}
    recompute: RecomputeSpec = msgspec.field(default_factory=RecomputeSpec)

    def tiers(self) -> dict[str, TierSpec]:
        """Configured tiers, nearest first."""
        out = {"hbm": self.hbm}
        for name in POOL_TIERS:
            spec = getattr(self, name)
            if spec is not None:
                out[name] = spec
        return out


def _check(cfg: TierConfig, source: str) -> TierConfig:
    """Cross-field checks msgspec cannot express; errors name the field."""
    for name, spec in cfg.tiers().items():
        if spec.link not in cfg.links:
            raise ConfigError(
                f"{source}: field `{name}.link`: link {spec.link!r} is not declared in `links` "
                f"(declared: {sorted(cfg.links)})"
            )
        if name == "hbm" and spec.method != "hbm":
            raise ConfigError(f"{source}: field `hbm.method` must be 'hbm', got {spec.method!r}")
        if name != "hbm" and spec.method == "hbm":
            raise ConfigError(f"{source}: field `{name}.method`: 'hbm' is only for the hbm tier")
    g = cfg.fetch_granularity
    if g is not None:
        if cfg.block_size % g:
            raise ConfigError(
                f"{source}: field `fetch_granularity` ({g}) must divide `block_size` ({cfg.block_size})"
            )
        if cfg.block_size // g > 64:
            raise ConfigError(
                f"{source}: field `fetch_granularity`: at most 64 sub-blocks per block "
                f"(block_size {cfg.block_size} / {g})"
            )
    return cfg


def config_from_dict(data: dict, source: str = "<dict>") -> TierConfig:
    try:
        cfg = msgspec.convert(data, TierConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return _check(cfg, source)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load_tier_config(spec: str | Path, overrides: dict | None = None) -> TierConfig:
    """A preset name (``memfabric``) or a ``.toml``/``.json`` path; ``overrides`` are merged
    over the top level (one level deep for tier tables) before validation."""
    path = Path(spec)
    if not path.suffix and not path.exists():
        path = PRESET_DIR / f"{spec}.toml"
        if not path.is_file():
            raise ConfigError(f"unknown tier preset {str(spec)!r} (presets: {preset_names()})")
    if not path.is_file():
        raise ConfigError(f"{path}: no such tier config file")
    raw = path.read_bytes()
    try:
        if path.suffix == ".json":
            data = json.loads(raw)
        elif tomllib is None:
            raise ConfigError(f"{path}: TOML configs need Python >= 3.11; use a .json config")
        else:
            data = tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot parse: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a table/object")
    for key, value in (overrides or {}).items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return config_from_dict(data, str(path))


def block_bytes(cfg: TierConfig) -> int:
    """Bytes of one (request, layer, block) of latent KV."""
    return cfg.block_size * cfg.kv_bytes_per_token
