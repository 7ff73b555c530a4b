"""Convert a Hugging Face DeepSeek-V3.2 checkpoint directory into kvtier's per-rank shards.

Input: the release layout (sharded ``*.safetensors`` + ``model.safetensors.index.json``,
DeepSeek key names, one key per routed expert, fp8 weights with ``weight_scale_inv`` block
scales, the MTP layer ``model.layers.{n_layers}``). Output: ``model{rank}-mp{N}.safetensors``
with the renames and tensor-parallel sharding of dsa_model.md §9, plus the tokenizer files.

The whole conversion is planned and validated from safetensors headers first (names, shapes,
dtypes), so a bad checkpoint fails with one line naming the tensor before anything is written.
Each rank's shard is then built from lazy slices (only that rank's bytes are read) and written
to a temporary name that is renamed into place, so peak memory is one output shard.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

#: HF module name -> (kvtier module name, shard dim or None for replicated), §9.
MAPPING: dict[str, tuple[str, int | None]] = {
    "embed_tokens": ("embed", 0),
    "input_layernorm": ("attn_norm", None),
    "post_attention_layernorm": ("ffn_norm", None),
    "q_proj": ("wq", 0),
    "q_a_proj": ("wq_a", None),
    "q_a_layernorm": ("q_norm", None),
    "q_b_proj": ("wq_b", 0),
    "kv_a_proj_with_mqa": ("wkv_a", None),
    "kv_a_layernorm": ("kv_norm", None),
    "kv_b_proj": ("wkv_b", 0),
    "o_proj": ("wo", 1),
    "gate": ("gate", None),
    "gate_proj": ("w1", 0),
    "down_proj": ("w2", 1),
    "up_proj": ("w3", 0),
    "norm": ("norm", None),
    "lm_head": ("head", 0),
    # the indexer keeps its names and is replicated on every rank
    "wq_b": ("wq_b", None),
    "wk": ("wk", None),
    "k_norm": ("k_norm", None),
    "weights_proj": ("weights_proj", None),
}

#: fp8 block size of the release's ``weight_scale_inv`` (128 x 128 tiles)
BLOCK = 128
INDEX_FILE = "model.safetensors.index.json"
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
_FP8_DTYPES = ("F8_E4M3", "F8_E5M2")


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the file and tensor."""


@dataclass(frozen=True)
class TensorPlan:
    """One converted tensor: where it comes from and how it is cut."""

    name: str  # kvtier name
    hf_name: str
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string, e.g. "BF16", "F8_E4M3"
    dim: int | None  # shard dim, None = replicated
    expert: int | None  # routed expert index (whole expert to one rank)


@dataclass
class ConversionPlan:
    """The validated conversion: every output tensor and its owner rank(s)."""

    hf_dir: Path
    n_experts: int
    mp: int
    tensors: list[TensorPlan] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # MTP tensors

    def rank_tensors(self, rank: int) -> Iterator[TensorPlan]:
        per_rank = self.n_experts // self.mp
        for t in self.tensors:
            if t.expert is None or rank * per_rank <= t.expert < (rank + 1) * per_rank:
                yield t


def shard_filename(rank: int, mp: int) -> str:
    """The file name a rank loads: ``model{rank}-mp{mp}.safetensors``."""
    return f"model{rank}-mp{mp}.safetensors"


def rename(hf_name: str) -> tuple[str, int | None, int | None]:
    """HF tensor name -> (kvtier name, shard dim, routed expert index).

    Raises ConversionError for a name outside the DeepSeek-V3.2 layout.
    """
    name = hf_name.removeprefix("model.")
    name = name.replace("self_attn", "attn").replace("mlp", "ffn")
    name = name.replace("weight_scale_inv", "scale").replace("e_score_correction_bias", "bias")
    parts = name.split(".")
    if len(parts) < 2 or parts[-1] not in ("weight", "scale", "bias"):
        raise ConversionError(f"unknown key {hf_name!r}: expected a .weight, .bias or .weight_scale_inv")
    key = parts[-2]
    if key not in MAPPING:
        raise ConversionError(f"unknown key {hf_name!r}: module {key!r} is not in the DeepSeek-V3.2 layout")
    new_key, dim = MAPPING[key]
    parts[-2] = new_key
    expert = None
    if "experts" in parts and "shared_experts" not in parts:
        try:
            expert = int(parts[-3])
        except (IndexError, ValueError):
            raise ConversionError(
                f"unknown key {hf_name!r}: routed expert keys must look like "
                "'model.layers.L.mlp.experts.J.<proj>.weight' (fused HF expert tensors are not "
                "a release layout)"
            ) from None
        dim = None
    if parts[-1] == "bias" and key not in ("gate", "k_norm"):
        raise ConversionError(f"unknown key {hf_name!r}: DeepSeek-V3.2 has no bias on {key!r}")
    return ".".join(parts), dim, expert


def expected_names(hf_config: dict) -> set[str]:
    """Every converted weight name (not scales) a complete checkpoint holds, from config.json."""
    try:
        n_layers = int(hf_config["num_hidden_layers"])
        n_dense = int(hf_config.get("first_k_dense_replace", 0))
        n_experts = int(hf_config["n_routed_experts"])
        q_lora = int(hf_config.get("q_lora_rank") or 0)
        n_shared = int(hf_config.get("n_shared_experts") or 0)
    except (KeyError, TypeError, ValueError) as exc:
        raise ConversionError(f"config.json: missing or invalid field {exc}") from None
    names = {"embed.weight", "norm.weight", "head.weight"}
    for layer in range(n_layers):
        p = f"layers.{layer}."
        names |= {p + "attn_norm.weight", p + "ffn_norm.weight"}
        attn = ["wkv_a", "kv_norm", "wkv_b", "wo"]
        attn += ["wq_a", "q_norm", "wq_b"] if q_lora else ["wq"]
        names |= {f"{p}attn.{m}.weight" for m in attn}
        idx = ["wq_b", "wk", "k_norm", "weights_proj"]
        names |= {f"{p}attn.indexer.{m}.weight" for m in idx} | {f"{p}attn.indexer.k_norm.bias"}
        mlps = [f"{p}ffn."] if layer < n_dense else [f"{p}ffn.experts.{j}." for j in range(n_experts)]
        if layer >= n_dense:
            names |= {f"{p}ffn.gate.weight", f"{p}ffn.gate.bias"}
            if n_shared:
                mlps.append(f"{p}ffn.shared_experts.")
        names |= {f"{m}{w}.weight" for m in mlps for w in ("w1", "w2", "w3")}
    return names


def _read_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) of one safetensors file, without reading tensor data."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            out = {}
            for name in f.keys():
                sl = f.get_slice(name)
                out[name] = (tuple(sl.get_shape()), sl.get_dtype())
            return out
    except Exception as exc:  # safetensors raises its own error types
        raise ConversionError(f"{path}: not a readable safetensors file: {exc}") from None


def _source_files(hf_dir: Path) -> dict[str, Path]:
    """HF tensor name -> file, from the index json when present, else every *.safetensors."""
    index = hf_dir / INDEX_FILE
    headers: dict[Path, dict] = {}
    sources: dict[str, Path] = {}
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConversionError(f"{index}: invalid index json ({exc})") from None
        for name, fname in weight_map.items():
            path = hf_dir / fname
            if path not in headers:
                if not path.is_file():
                    raise ConversionError(f"{index}: tensor {name!r} is in {fname}, which is missing")
                headers[path] = _read_header(path)
            if name not in headers[path]:
                raise ConversionError(f"{path}: missing tensor {name!r} (listed in {INDEX_FILE})")
            sources[name] = path
        return sources
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"{hf_dir}: no *.safetensors files and no {INDEX_FILE}")
    for path in files:
        for name in _read_header(path):
            if name in sources:
                raise ConversionError(f"{path}: tensor {name!r} also appears in {sources[name].name}")
            sources[name] = path
    return sources


def plan_conversion(hf_dir: str | Path, n_experts: int, mp: int) -> ConversionPlan:
    """Validate an HF checkpoint directory against §9 and return what each rank receives."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise ConversionError(f"{hf_dir}: not a directory")
    if mp < 1:
        raise ConversionError(f"--model-parallel must be >= 1, got {mp}")
    if n_experts < 1 or n_experts % mp:
        raise ConversionError(f"--n-experts ({n_experts}) must be a positive multiple of --model-parallel ({mp})")
    config_path = hf_dir / "config.json"
    hf_config: dict | None = None
    if config_path.is_file():
        try:
            hf_config = json.loads(config_path.read_text())
        except json.JSONDecodeError as exc:
            raise ConversionError(f"{config_path}: line {exc.lineno}: invalid JSON: {exc.msg}") from None
        cfg_experts = hf_config.get("n_routed_experts")
        if cfg_experts is not None and int(cfg_experts) != n_experts:
            raise ConversionError(
                f"--n-experts {n_experts} does not match {config_path}: n_routed_experts = {cfg_experts}"
            )
    n_layers = int(hf_config["num_hidden_layers"]) if hf_config else 61
    plan = ConversionPlan(hf_dir=hf_dir, n_experts=n_experts, mp=mp)
    headers: dict[Path, dict] = {}
    by_name: dict[str, TensorPlan] = {}
    for hf_name, path in _source_files(hf_dir).items():
        m = _LAYER_RE.match(hf_name)
        if m and int(m.group(1)) >= n_layers:  # the MTP layer(s)
            plan.skipped.append(hf_name)
            continue
        name, dim, expert = rename(hf_name)
        if expert is not None and expert >= n_experts:
            raise ConversionError(f"{path.name}: tensor {hf_name!r} names expert {expert} >= --n-experts {n_experts}")
        if path not in headers:
            headers[path] = _read_header(path)
        shape, dtype = headers[path][hf_name]
        is_scale = name.endswith(".scale")  # checked with its weight in _check_scales
        if dim is not None and not is_scale and (len(shape) <= dim or shape[dim] % mp):
            size = shape[dim] if len(shape) > dim else "absent"
            raise ConversionError(
                f"{path.name}: tensor {hf_name!r} shape {list(shape)}: dim {dim} ({size}) "
                f"is not divisible by --model-parallel {mp}"
            )
        if name in by_name:
            raise ConversionError(f"{path.name}: tensor {hf_name!r} maps to {name!r} twice")
        by_name[name] = TensorPlan(name, hf_name, path, shape, dtype, dim, expert)
    _check_scales(by_name, mp)
    if hf_config is not None:
        missing = sorted(expected_names(hf_config) - by_name.keys(), key=_natural)
        if missing:
            raise ConversionError(
                f"{hf_dir}: missing tensor {missing[0]!r} (HF name {to_hf_name(missing[0])!r})"
                + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
            )
    plan.tensors = sorted(by_name.values(), key=lambda t: _natural(t.name))
    return plan


def _check_scales(by_name: dict[str, TensorPlan], mp: int) -> None:
    """fp8 weights need their block scales and vice versa; sharded fp8 cuts on 128-blocks."""
    for name, t in by_name.items():
        if name.endswith(".scale"):
            weight = by_name.get(name[: -len("scale")] + "weight")
            if weight is None or weight.dtype not in _FP8_DTYPES:
                raise ConversionError(f"{t.file.name}: tensor {t.hf_name!r} has no matching fp8 weight")
            want = tuple(-(-s // BLOCK) for s in weight.shape)
            if t.shape != want:
                raise ConversionError(
                    f"{t.file.name}: tensor {t.hf_name!r} shape {list(t.shape)} does not match "
                    f"{list(want)} (128x128 blocks of weight {list(weight.shape)})"
                )
        elif t.dtype in _FP8_DTYPES:
            if name[: -len("weight")] + "scale" not in by_name:
                raise ConversionError(
                    f"{t.file.name}: missing tensor {t.hf_name + '_scale_inv'!r} (block scales of fp8 weight)"
                )
            if t.dim is not None and (t.shape[t.dim] // mp) % BLOCK:
                raise ConversionError(
                    f"{t.file.name}: tensor {t.hf_name!r} shape {list(t.shape)}: the dim-{t.dim} shard "
                    f"({t.shape[t.dim] // mp}) must be a multiple of {BLOCK} for its fp8 block scales"
                )


def to_hf_name(name: str) -> str:
    """kvtier name -> HF release name (the inverse of ``rename``), for error messages and tests."""
    inverse = {v[0]: k for k, v in MAPPING.items() if k not in ("wq_b",)}
    parts = name.split(".")
    leaf = parts[-1]
    if "indexer" not in parts:
        parts[-2] = inverse.get(parts[-2], parts[-2])
    if leaf == "scale":
        parts[-1] = "weight_scale_inv"
    elif leaf == "bias" and parts[-2] == "gate":
        parts[-1] = "e_score_correction_bias"
    out = ".".join(parts).replace("attn.", "self_attn.", 1).replace("ffn.", "mlp.", 1)
    return out if out.startswith("lm_head") else "model." + out


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in name.split(".")]


def _load_shard(handle, t: TensorPlan, rank: int, mp: int):
    """Read only rank ``rank``'s part of tensor ``t`` (a lazy safetensors slice)."""
    sl = handle.get_slice(t.hf_name)
    if t.dim is None or mp == 1:
        return sl[:]
    size = t.shape[t.dim] // mp  # for a scale: 128-blocks, aligned by _check_scales
    index = [slice(None)] * len(t.shape)
    index[t.dim] = slice(rank * size, (rank + 1) * size)
    return sl[tuple(index)].contiguous()


def convert(
    hf_dir: str | Path, save_dir: str | Path, n_experts: int, mp: int, progress: bool = True
) -> list[Path]:
    """Convert ``hf_dir`` into ``save_dir/model{i}-mp{mp}.safetensors``; return the written files."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm import tqdm

    plan = plan_conversion(hf_dir, n_experts, mp)
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    files = sorted({t.file for t in plan.tensors})
    handles = {path: safe_open(str(path), framework="pt", device="cpu") for path in files}
    written = []
    for rank in range(mp):
        todo = list(plan.rank_tensors(rank))
        state = {}
        for t in tqdm(todo, desc=f"rank {rank}/{mp}", unit="tensor", disable=not progress):
            state[t.name] = _load_shard(handles[t.file], t, rank, mp)
        out = save_dir / shard_filename(rank, mp)
        tmp = out.with_name(out.name + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out)
        written.append(out)
        del state
    for path in sorted(Path(hf_dir).glob("*token*")):
        if path.is_file():
            shutil.copyfile(path, save_dir / path.name)
    return written
