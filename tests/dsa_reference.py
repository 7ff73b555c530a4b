"""An independent re-statement of the DeepSeek-V3.2-Exp reference forward (dsa_model.md §3-§8),
written from the spec and not from kvtier's code, plus tiny checkpoints in the reference's own
layout. Used by tests/test_reference_numerics.py (kvtier vs this, layer by layer) and
tests/test_generate_cli.py (a traced ``kvtier generate`` run on such a checkpoint)."""

from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F

BF16 = torch.bfloat16
E4M3 = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128


# ------------------------------------------------------------------- the checkpoint
#: the reference's own config.json keys (dsa_model.md §2); fp8 needs 128-multiples
BASE = {
    "max_batch_size": 2, "max_seq_len": 256, "dtype": "fp8", "scale_fmt": "ue8m0",
    "vocab_size": 320, "dim": 128, "inter_dim": 256, "moe_inter_dim": 128, "n_layers": 3,
    "n_dense_layers": 1, "n_heads": 2, "n_routed_experts": 4, "n_shared_experts": 1,
    "n_activated_experts": 2, "n_expert_groups": 2, "n_limited_groups": 1,
    "score_func": "sigmoid", "route_scale": 2.5, "q_lora_rank": 128, "kv_lora_rank": 128,
    "qk_nope_head_dim": 64, "qk_rope_head_dim": 64, "v_head_dim": 64, "index_n_heads": 8,
    "index_head_dim": 128, "index_topk": 16,
}  # fmt: skip


def _quant_tiles(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight as the release stores it: e4m3 with one fp32 scale (amax/448) per 128x128 tile."""
    n, k = w.shape
    nb, kb = -(-n // BLOCK), -(-k // BLOCK)
    scale = torch.empty(nb, kb)
    q = torch.empty(n, k, dtype=E4M3)
    for i in range(nb):
        for j in range(kb):
            tile = w[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK]
            s = tile.abs().max().clamp_min(1e-12) / FP8_MAX
            scale[i, j] = s
            q[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK] = (tile / s).to(E4M3)
    return q, scale


def reference_checkpoint(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    """Random weights under the converted names of dsa_model.md §9, in the release dtypes."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}

    def fp8(name: str, n: int, k: int) -> None:
        q, s = _quant_tiles(torch.randn(n, k, generator=g) * k**-0.5)
        out[name + ".weight"], out[name + ".scale"] = q, s

    def bf16(name: str, *shape: int, std: float = 1.0, mean: float = 0.0) -> None:
        out[name] = (mean + std * torch.randn(*shape, generator=g)).to(BF16)

    d, h, rope = cfg["dim"], cfg["n_heads"], cfg["qk_rope_head_dim"]
    nope, v = cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    ql, kvl = cfg["q_lora_rank"], cfg["kv_lora_rank"]
    bf16("embed.weight", cfg["vocab_size"], d)
    bf16("norm.weight", d, std=0.05, mean=1.0)
    bf16("head.weight", cfg["vocab_size"], d, std=d**-0.5)
    for layer in range(cfg["n_layers"]):
        p = f"layers.{layer}."
        bf16(p + "attn_norm.weight", d, std=0.05, mean=1.0)
        bf16(p + "ffn_norm.weight", d, std=0.05, mean=1.0)
        fp8(p + "attn.wq_a", ql, d)
        bf16(p + "attn.q_norm.weight", ql, std=0.05, mean=1.0)
        fp8(p + "attn.wq_b", h * (nope + rope), ql)
        fp8(p + "attn.wkv_a", kvl + rope, d)
        bf16(p + "attn.kv_norm.weight", kvl, std=0.05, mean=1.0)
        fp8(p + "attn.wkv_b", h * (nope + v), kvl)
        fp8(p + "attn.wo", d, h * v)
        ih, ihd = cfg["index_n_heads"], cfg["index_head_dim"]
        fp8(p + "attn.indexer.wq_b", ih * ihd, ql)
        fp8(p + "attn.indexer.wk", ihd, d)
        bf16(p + "attn.indexer.k_norm.weight", ihd, std=0.05, mean=1.0)
        bf16(p + "attn.indexer.k_norm.bias", ihd, std=0.05)
        bf16(p + "attn.indexer.weights_proj.weight", ih, d, std=d**-0.5)
        if layer < cfg["n_dense_layers"]:
            mlps, width = [p + "ffn."], cfg["inter_dim"]
        else:
            bf16(p + "ffn.gate.weight", cfg["n_routed_experts"], d, std=d**-0.5)
            mlps = [f"{p}ffn.experts.{j}." for j in range(cfg["n_routed_experts"])]
            mlps.append(p + "ffn.shared_experts.")
            width = cfg["moe_inter_dim"]
        for m in mlps:
            w = width * (cfg["n_shared_experts"] if m.endswith("shared_experts.") else 1)
            fp8(m + "w1", w, d)
            fp8(m + "w2", d, w)
            fp8(m + "w3", w, d)
    return out


def write_reference_checkpoint(path, cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import save_file

    tensors = reference_checkpoint(cfg, seed)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model0-mp1.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return tensors


# --------------------------------------------------------------- kernel numerics (§8)
def e4m3_round(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 values in [-448, 448] to the nearest e4m3 value (ties to even), by hand:
    3 mantissa bits, normal exponents from -6, subnormal spacing 2^-9."""
    xd = x.double()
    _, e = torch.frexp(xd.abs())  # |x| = m * 2^e, m in [0.5, 1): floor(log2|x|) = e - 1
    step = torch.ldexp(torch.ones_like(xd), (e - 1).clamp_min(-6) - 3)
    return (torch.round(xd / step) * step).float()  # torch.round: half to even


def ue8m0(s: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2 s) from the fp32 bits: the exponent, plus one if the mantissa is non-zero."""
    bits = s.contiguous().view(torch.int32)
    exp = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return torch.ldexp(torch.ones_like(s), exp)


def act_quant(x: torch.Tensor, scale_fmt: str | None):
    """(e4m3 values as fp32, fp32 scales [..., N/128]) of a bf16 ``x``."""
    g = x.float().unflatten(-1, (-1, BLOCK))
    s = g.abs().amax(-1).clamp_min(1e-4) * torch.tensor(1 / FP8_MAX, dtype=torch.float32)
    if scale_fmt is not None:
        s = ue8m0(s)
    return e4m3_round((g / s.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX)).flatten(-2), s


def dequant(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (q.unflatten(-1, (-1, BLOCK)) * s.unsqueeze(-1)).flatten(-2)


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


H128 = _sylvester(128)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """fast_hadamard_transform(x, scale=n^-0.5): the exact transform, rounded once to fp32,
    one fp32 multiply by the scale, bf16."""
    n = x.size(-1)
    exact = (x.double() @ H128[:n, :n]).float()
    return (exact * torch.tensor(n**-0.5, dtype=torch.float32)).to(BF16)


# ------------------------------------------------------------------ the reference model
class Reference:
    """The reference forward (v2, or v1 with ``v1=True``) over a tensor dict, bf16 activations."""

    def __init__(self, cfg: dict, tensors: dict[str, torch.Tensor], v1: bool = False):
        self.cfg, self.t, self.v1 = cfg, tensors, v1
        self.fmt = cfg["scale_fmt"]
        b, s = cfg["max_batch_size"], cfg["max_seq_len"]
        n = cfg["n_layers"]
        self.kv = [torch.zeros(b, s, cfg["kv_lora_rank"], dtype=BF16) for _ in range(n)]
        self.pe = [torch.zeros(b, s, cfg["qk_rope_head_dim"], dtype=BF16) for _ in range(n)]
        self.k8 = [torch.zeros(b, s, cfg["index_head_dim"]) for _ in range(n)]
        self.ks = [torch.zeros(b, s, 1) for _ in range(n)]
        # RoPE and YaRN (§4), with the reference's defaults for the fields the json leaves out
        rope, theta = cfg["qk_rope_head_dim"], cfg.get("rope_theta", 10000.0)
        orig, factor = cfg.get("original_seq_len", 4096), cfg.get("rope_factor", 40.0)
        freqs = 1.0 / (theta ** (torch.arange(0, rope, 2, dtype=torch.float32) / rope))
        self.scale = (cfg["qk_nope_head_dim"] + rope) ** -0.5
        if s > orig:  # YaRN applies iff max_seq_len > original_seq_len

            def corr(r):
                return rope * math.log(orig / (r * 2 * math.pi)) / (2 * math.log(theta))

            low = max(math.floor(corr(cfg.get("beta_fast", 32))), 0)
            high = min(math.ceil(corr(cfg.get("beta_slow", 1))), rope - 1)
            ramp = (torch.arange(rope // 2, dtype=torch.float32) - low) / (high - low)
            smooth = 1 - ramp.clamp(0, 1)
            freqs = freqs / factor * (1 - smooth) + freqs * smooth
            m = 0.1 * cfg.get("mscale", 1.0) * math.log(factor) + 1.0
            self.scale *= m * m
        angles = torch.outer(torch.arange(s, dtype=torch.float32), freqs)
        self.freqs_cis = torch.polar(torch.ones_like(angles), angles)

    # building blocks
    def w(self, name: str) -> torch.Tensor:
        return self.t[name]

    def linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """fp8 weight: act_quant(x) and the per-block scaled product in fp32, cast to bf16."""
        w, s = self.t[name + ".weight"], self.t[name + ".scale"]
        n, k = w.shape
        wd = w.float() * s.repeat_interleave(BLOCK, 0)[:n].repeat_interleave(BLOCK, 1)[:, :k]
        xq, xs = act_quant(x, self.fmt)
        a = dequant(xq, xs)
        return (a.reshape(-1, k) @ wd.t()).view(*x.shape[:-1], n).to(BF16)

    @staticmethod
    def rms(x, weight, residual=None, eps=1e-6):
        r = x.float() if residual is None else x.float() + residual.float()
        y = (weight.float() * (r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps))).to(x.dtype)
        return y if residual is None else (y, r.to(x.dtype))

    def rope(self, x: torch.Tensor, start: int, interleaved: bool) -> torch.Tensor:
        """Rotate pairs (2i, 2i+1) or (i, i + d/2) of x[b, s, h, d] by exp(j p f_i) in fp32."""
        f = self.freqs_cis[start : start + x.size(1)].view(1, x.size(1), 1, -1)
        xf = x.float()
        d = x.size(-1)
        if interleaved:
            c = torch.complex(xf[..., 0::2], xf[..., 1::2])
        else:
            c = torch.complex(xf[..., : d // 2], xf[..., d // 2 :])
        y = c * f
        if interleaved:
            out = torch.stack([y.real, y.imag], dim=-1).flatten(-2)
        else:
            out = torch.cat([y.real, y.imag], dim=-1)
        return out.to(x.dtype)

    def mlp(self, x: torch.Tensor, p: str) -> torch.Tensor:
        h = F.silu(self.linear(x, p + "w1").float()) * self.linear(x, p + "w3").float()
        return self.linear(h.to(x.dtype), p + "w2")

    # indexer (§6): returns the fp32 score [b, s, end] (float64 sums, rounded to fp32)
    def indexer(self, layer, x, qr, start, mask):
        c, p = self.cfg, f"layers.{layer}.attn.indexer."
        b, s, _ = x.shape
        end = start + s
        ih, d, rope = c["index_n_heads"], c["index_head_dim"], c["qk_rope_head_dim"]
        q = self.linear(qr, p + "wq_b").view(b, s, ih, d)
        q = torch.cat([self.rope(q[..., :rope], start, self.v1), q[..., rope:]], dim=-1)
        k_w, k_b = self.w(p + "k_norm.weight").float(), self.w(p + "k_norm.bias").float()
        k = F.layer_norm(self.linear(x, p + "wk").float(), (d,), k_w, k_b, 1e-6).to(x.dtype)
        k = k.unsqueeze(2)
        k = torch.cat([self.rope(k[..., :rope], start, self.v1), k[..., rope:]], dim=-1).squeeze(2)
        q8, q_s = act_quant(hadamard(q), self.fmt)  # [b, s, ih, d], [b, s, ih, 1]
        k8, k_s = act_quant(hadamard(k), self.fmt)  # [b, s, d], [b, s, 1]
        self.k8[layer][:b, start:end], self.ks[layer][:b, start:end] = k8, k_s
        wp = self.w(p + "weights_proj.weight")
        if self.v1:  # default dtype (bf16) projection, scaled in bf16
            wts = F.linear(x, wp) * ih**-0.5
        else:  # v2: fp32 weights on x.float()
            wts = F.linear(x.float(), wp.float()) * ih**-0.5
        wts = wts.unsqueeze(-1) * q_s * d**-0.5  # [b, s, ih, 1] fp32: q's scale folded in
        keys, key_s = self.k8[layer][:b, :end].double(), self.ks[layer][:b, :end, 0].double()
        logits = torch.relu(torch.einsum("bshd,btd->bsht", q8.double(), keys))
        score = ((wts.double() * logits).sum(2) * key_s.unsqueeze(1)).float()
        return score if mask is None else score + mask

    # MLA (§5)
    def attention(self, layer, x, start, mask):
        c, p = self.cfg, f"layers.{layer}.attn."
        b, s, _ = x.shape
        end = start + s
        h, nope, rope = c["n_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"]
        v, kvl = c["v_head_dim"], c["kv_lora_rank"]
        qr = self.rms(self.linear(x, p + "wq_a"), self.w(p + "q_norm.weight"))
        q = self.linear(qr, p + "wq_b").view(b, s, h, nope + rope)
        q_nope, q_pe = q[..., :nope], self.rope(q[..., nope:], start, True)
        kv_all = self.linear(x, p + "wkv_a")
        kv = self.rms(kv_all[..., :kvl], self.w(p + "kv_norm.weight"))
        k_pe = self.rope(kv_all[..., kvl:].unsqueeze(2), start, True)
        if not self.v1:  # the fp8 latent cache, simulated
            kv = dequant(*act_quant(kv, self.fmt)).to(kv.dtype)
        self.kv[layer][:b, start:end], self.pe[layer][:b, start:end] = kv, k_pe.squeeze(2)
        score = self.indexer(layer, x, qr, start, mask)
        topk = score.topk(min(c["index_topk"], end), dim=-1)
        index_mask = torch.full((b, s, end), float("-inf")).scatter_(-1, topk.indices, 0)
        cdt = torch.float32 if self.v1 else BF16  # v1: score einsums and softmax in fp32
        if mask is not None:  # MHA prefill over the chunk
            kvb = self.linear(kv, p + "wkv_b").view(b, s, h, nope + v)
            k = torch.cat([kvb[..., :nope], k_pe.expand(-1, -1, h, -1)], dim=-1)
            qq = torch.cat([q_nope, q_pe], dim=-1)
            att = torch.einsum("bshd,bthd->bsht", qq.to(cdt), k.to(cdt)) * self.scale
            att = (att + (index_mask + mask).unsqueeze(2)).softmax(dim=-1)
            out = torch.einsum("bsht,bthd->bshd", att.to(BF16), kvb[..., nope:])
        else:  # absorbed decode, dense over every cached position, masked to the top-k
            wkv_b = self.t[p + "wkv_b.weight"].float()
            sc = self.t[p + "wkv_b.scale"].repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
            wkv_b = (wkv_b * sc[: wkv_b.size(0), : wkv_b.size(1)]).to(BF16).view(h, nope + v, kvl)
            q_abs = torch.einsum("bshd,hdc->bshc", q_nope, wkv_b[:, :nope])
            kvc, pec = self.kv[layer][:b, :end], self.pe[layer][:b, :end]
            att = torch.einsum("bshc,btc->bsht", q_abs.to(cdt), kvc.to(cdt))
            att = (att + torch.einsum("bshr,btr->bsht", q_pe.to(cdt), pec.to(cdt))) * self.scale
            att = (att + index_mask.unsqueeze(2)).softmax(dim=-1)
            o = torch.einsum("bsht,btc->bshc", att.to(BF16), kvc)
            out = torch.einsum("bshc,hdc->bshd", o, wkv_b[:, nope:])
        return self.linear(out.flatten(2), p + "wo"), topk, score

    # Gate + MoE (§7), no router bias (dim != 7168)
    def moe(self, layer, x):
        c, p = self.cfg, f"layers.{layer}.ffn."
        shape = x.shape
        x = x.view(-1, shape[-1])
        scores = F.linear(x.float(), self.w(p + "gate.weight").float()).sigmoid()
        grouped = scores.view(x.size(0), c["n_expert_groups"], -1)
        keep = grouped.amax(-1).topk(c["n_limited_groups"], dim=-1).indices
        drop = torch.ones(x.size(0), c["n_expert_groups"], dtype=torch.bool)
        drop.scatter_(1, keep, False)
        masked = grouped.masked_fill(drop.unsqueeze(-1), float("-inf")).flatten(1)
        idx = masked.topk(c["n_activated_experts"], dim=-1).indices
        wts = scores.gather(1, idx)
        wts = wts / wts.sum(-1, keepdim=True) * c["route_scale"]
        y = torch.zeros_like(x, dtype=torch.float32)
        for e in range(c["n_routed_experts"]):
            rows, slot = torch.where(idx == e)
            if rows.numel():
                y[rows] += self.mlp(x[rows], f"{p}experts.{e}.") * wts[rows, slot, None]
        y += self.mlp(x, p + "shared_experts.")
        return y.to(x.dtype).view(shape)

    def forward(self, tokens: torch.Tensor, start: int):
        """(logits fp32 [b, vocab], per layer (topk, score))."""
        s = tokens.size(1)
        mask = torch.full((s, s), float("-inf")).triu_(1) if s > 1 else None
        h, res = self.t["embed.weight"][tokens], None
        picks = []
        for layer in range(self.cfg["n_layers"]):
            p = f"layers.{layer}."
            if res is None:
                x, res = self.rms(h, self.w(p + "attn_norm.weight")), h
            else:
                x, res = self.rms(h, self.w(p + "attn_norm.weight"), res)
            a, topk, score = self.attention(layer, x, start, mask)
            picks.append((topk, score))
            x, res = self.rms(a, self.w(p + "ffn_norm.weight"), res)
            dense = layer < self.cfg["n_dense_layers"]
            h = self.mlp(x, p + "ffn.") if dense else self.moe(layer, x)
        h, _ = self.rms(h, self.w("norm.weight"), res)
        return F.linear(h[:, -1].float(), self.w("head.weight").float()), picks


# ---------------------------------------------------------------------- the comparison
def kvtier_run(model, tokens: torch.Tensor, prompt: int):
    picks: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [layer.attn.indexer.register_forward_hook(lambda _m, _i, out: picks.append(out))
             for layer in model.layers]  # fmt: skip
    try:
        logits = [model(tokens[:, :prompt], 0)]
        for pos in range(prompt, tokens.size(1)):
            logits.append(model(tokens[:, pos : pos + 1], pos))
    finally:
        for hk in hooks:
            hk.remove()
    n = len(model.layers)
    return logits, [picks[i : i + n] for i in range(0, len(picks), n)]


def reference_run(ref: Reference, tokens: torch.Tensor, prompt: int):
    logits, picks = [], []
    for start, end in [(0, prompt)] + [(p, p + 1) for p in range(prompt, tokens.size(1))]:
        lg, pk = ref.forward(tokens[:, start:end], start)
        logits.append(lg)
        picks.append(pk)
    return logits, picks


def selected(indices: torch.Tensor, values: torch.Tensor, end: int) -> torch.Tensor:
    """Boolean [b, s, end]: the positions selected with a finite score."""
    sel = torch.zeros(*indices.shape[:-1], end, dtype=torch.bool)
    return sel.scatter_(-1, indices, values.isfinite())
