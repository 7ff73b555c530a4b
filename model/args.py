"""Model hyper-parameters (``ModelArgs``) in the DeepSeek demo config format.

Kept free of torch so configs can be validated (and CLIs can print --help) without it.
Defaults are the reference dataclass defaults (dsa_model.md §2); the shipped
``configs/config_671B_v3.2.json`` overrides them like the upstream json does.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG_DIR = Path(__file__).with_name("configs")

_DTYPES = ("bf16", "fp8", "fp32")
_SCORE_FUNCS = ("softmax", "sigmoid")
_SCALE_FMTS = (None, "ue8m0")


class ConfigError(ValueError):
    """An invalid model config; the message names the file and the field."""


@dataclass
class ModelArgs:
    """DeepSeek-V3.2-Exp hyper-parameters plus kvtier's mode flags.

    kvtier-only fields (not in upstream configs):
      * ``v1``: reproduce upstream commit 3b99a53 (interleaved indexer RoPE, default-dtype
        ``weights_proj``, no latent fake-quantisation, fp32 MLA score einsums and softmax with the
        rest of MLA in the activation dtype).
      * ``indexer_exact``: fp32 indexer without Hadamard or fp8 (HF transformers' formula);
        also skips the v2 latent fake-quantisation so that a cross-check is comparable.
      * ``gate_bias``: create the routing correction bias (``ffn.gate.bias``). ``None`` (the
        default) follows the reference: a bias only when ``dim == 7168``;
        ``loading.build_model`` also turns it on when the checkpoint carries the bias (HF
        checkpoints always have ``e_score_correction_bias``). ``True``/``False`` force it.
      * ``dtype="fp32"``: fp32 weights for exact-mode runs under ``set_default_dtype(float32)``.
    """

    max_batch_size: int = 8
    max_seq_len: int = 4096 * 4
    dtype: str = "bf16"
    scale_fmt: str | None = None
    vocab_size: int = 102400
    dim: int = 2048
    inter_dim: int = 10944
    moe_inter_dim: int = 1408
    n_layers: int = 27
    n_dense_layers: int = 1
    n_heads: int = 16
    # moe
    n_routed_experts: int = 64
    n_shared_experts: int = 2
    n_activated_experts: int = 6
    n_expert_groups: int = 1
    n_limited_groups: int = 1
    score_func: str = "softmax"
    route_scale: float = 1.0
    # mla
    q_lora_rank: int = 0
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # yarn
    original_seq_len: int = 4096
    rope_theta: float = 10000.0
    rope_factor: float = 40.0
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0
    # index
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048
    # kvtier flags
    v1: bool = False
    indexer_exact: bool = False
    gate_bias: bool | None = None

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> ModelArgs:
        """Build from a demo-format mapping; unknown or mistyped fields raise ConfigError."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if "hidden_size" in data and "dim" not in data:
            raise ConfigError(
                f"{source}: this is a Hugging Face config.json (field 'hidden_size'); --config "
                "takes the reference's ModelArgs json (dim, n_layers, ...), e.g. "
                "model/configs/config_671B_v3.2.json"
            )
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key not in fields:
                raise ConfigError(f"{source}: {_unknown_field(key, fields)}")
            kwargs[key] = _coerce(key, value, fields[key].type, source)
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_json(cls, path: str | Path, **overrides: Any) -> ModelArgs:
        """Read a DeepSeek demo config json (e.g. ``config_671B_v3.2.json``).

        ``overrides`` replace json fields (e.g. ``max_seq_len``, ``indexer_exact``).
        """
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: line {exc.lineno}: invalid JSON: {exc.msg}") from None
        if isinstance(data, dict):
            data = {**data, **overrides}
        return cls.from_dict(data, source=str(path))

    @classmethod
    def builtin(cls, name: str, **overrides: Any) -> ModelArgs:
        """Load a shipped config by name: ``671B_v3.2``, ``tiny`` or ``demo``."""
        path = CONFIG_DIR / f"config_{name}.json"
        if not path.is_file():
            known = sorted(p.stem.removeprefix("config_") for p in CONFIG_DIR.glob("config_*.json"))
            raise ConfigError(f"unknown builtin config {name!r}; known: {', '.join(known)}")
        return cls.from_json(path, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field."""
        positive = (
            "max_batch_size", "max_seq_len", "vocab_size", "dim", "inter_dim", "moe_inter_dim",
            "n_layers", "n_heads", "n_routed_experts", "n_activated_experts", "n_expert_groups",
            "n_limited_groups", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
            "qk_rope_head_dim", "v_head_dim", "original_seq_len", "index_n_heads",
            "index_head_dim", "index_topk",
        )  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                hint = " (the indexer reads the q-latent)" if name == "q_lora_rank" else ""
                raise ConfigError(f"field {name!r} must be a positive integer, got {value!r}{hint}")
        for name in ("n_dense_layers", "n_shared_experts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"field {name!r} must be a non-negative integer, got {value!r}")
        for name in ("rope_theta", "rope_factor", "route_scale", "mscale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"field {name!r} must be a positive number, got {value!r}")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"field 'dtype' must be one of {_DTYPES}, got {self.dtype!r}")
        if self.scale_fmt not in _SCALE_FMTS:
            raise ConfigError(f"field 'scale_fmt' must be null or 'ue8m0', got {self.scale_fmt!r}")
        if self.score_func not in _SCORE_FUNCS:
            raise ConfigError(
                f"field 'score_func' must be one of {_SCORE_FUNCS}, got {self.score_func!r}"
            )
        if self.n_dense_layers > self.n_layers:
            raise ConfigError(
                f"field 'n_dense_layers' ({self.n_dense_layers}) exceeds n_layers ({self.n_layers})"
            )
        if self.n_activated_experts > self.n_routed_experts:
            raise ConfigError("field 'n_activated_experts' exceeds n_routed_experts")
        if self.n_routed_experts % self.n_expert_groups:
            raise ConfigError("field 'n_expert_groups' must divide n_routed_experts")
        if self.n_limited_groups > self.n_expert_groups:
            raise ConfigError("field 'n_limited_groups' exceeds n_expert_groups")
        per_group = self.n_routed_experts // self.n_expert_groups
        if self.n_expert_groups > 1 and self.has_gate_bias and per_group < 2:
            raise ConfigError(
                "field 'n_expert_groups': biased group scores need >= 2 experts per group"
            )
        if self.n_limited_groups * per_group < self.n_activated_experts:
            raise ConfigError(
                "field 'n_limited_groups': the kept groups hold fewer experts than n_activated_experts"
            )
        if self.qk_rope_head_dim % 2:
            raise ConfigError("field 'qk_rope_head_dim' must be even")
        if self.qk_rope_head_dim > self.index_head_dim:
            raise ConfigError("field 'index_head_dim' must be >= qk_rope_head_dim")
        if not self.indexer_exact:
            if self.index_head_dim != 128:
                raise ConfigError(
                    "field 'index_head_dim' must be 128 for the fp8 indexer (one scale per key)"
                )
            if not self.v1 and self.kv_lora_rank % 128:
                raise ConfigError("field 'kv_lora_rank' must be a multiple of 128 (v2 fp8 latent)")
        if self.dtype == "fp8":  # fp8 Linear layers quantise their inputs in groups of 128
            fp8_inputs = {
                "dim": self.dim,
                "q_lora_rank": self.q_lora_rank,
                "kv_lora_rank": self.kv_lora_rank,
                "inter_dim": self.inter_dim,
                "moe_inter_dim": self.moe_inter_dim,
                "n_heads * v_head_dim": self.n_heads * self.v_head_dim,
            }
            for name, value in fp8_inputs.items():
                if value % 128:
                    raise ConfigError(
                        f"field {name!r} ({value}) must be a multiple of 128 when dtype is 'fp8'"
                    )
        if self.beta_fast <= self.beta_slow:
            raise ConfigError("field 'beta_fast' must exceed beta_slow")

    # ------------------------------------------------------------ derived values
    @property
    def has_gate_bias(self) -> bool:
        """Whether MoE gates carry the correction bias: ``gate_bias``, or the reference's
        rule (``dim == 7168``) when it is None."""
        return self.dim == 7168 if self.gate_bias is None else self.gate_bias

    @property
    def yarn(self) -> bool:
        """YaRN applies iff the context exceeds the pre-training length (a config property)."""
        return self.max_seq_len > self.original_seq_len

    @property
    def softmax_scale(self) -> float:
        """MLA softmax scale: qk_head_dim^-0.5, times mscale^2 under YaRN."""
        scale = (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5
        if self.yarn:
            m = 0.1 * self.mscale * math.log(self.rope_factor) + 1.0
            scale *= m * m
        return scale

    @property
    def yarn_range(self) -> tuple[int, int]:
        """(low, high) rotary dims of the YaRN ramp, clamped to [0, rope_dim - 1]."""
        dim = self.qk_rope_head_dim

        def corr(rot: float) -> float:
            return (
                dim
                * math.log(self.original_seq_len / (rot * 2 * math.pi))
                / (2 * math.log(self.rope_theta))
            )

        low = math.floor(corr(self.beta_fast))
        high = math.ceil(corr(self.beta_slow))
        return max(low, 0), min(high, dim - 1)


#: kvtier's own fields; every other field is the reference ``ModelArgs``'s (dsa_model.md §2)
KVTIER_FIELDS = ("v1", "indexer_exact", "gate_bias")


def _unknown_field(key: str, fields: dict[str, Any]) -> str:
    """``unknown field 'x'`` plus the closest known name, for typos."""
    import difflib

    close = difflib.get_close_matches(key, fields, n=1, cutoff=0.75)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return (
        f"unknown field {key!r}{hint} (a config holds the reference ModelArgs fields and "
        f"kvtier's {', '.join(KVTIER_FIELDS)})"
    )


def _coerce(key: str, value: Any, annotation: Any, source: str) -> Any:
    """Check a json value against a field's annotation (ints accepted for floats)."""
    ann = str(annotation)
    if ann == "bool":
        ok = isinstance(value, bool)
    elif ann == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif ann == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif ann == "str":
        ok = isinstance(value, str)
    elif ann == "bool | None":
        ok = value is None or isinstance(value, bool)
    elif ann == "str | None":
        ok = value is None or isinstance(value, str)
    else:  # pragma: no cover - all fields are covered above
        ok = True
    if not ok:
        raise ConfigError(f"{source}: field {key!r} must be {ann}, got {value!r}")
    return value
