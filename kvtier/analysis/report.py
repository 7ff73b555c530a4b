"""``kvtier report``: figures (matplotlib PNGs) and one self-contained HTML page from analyses.

Every figure is drawn from ``analysis.json`` dicts only (``kvtier.analysis.analyze``), so a
report can be rebuilt from saved analyses. Several traces are drawn side by side: curves of all
traces share one axes (one colour per trace), heatmaps and bar charts get one panel per trace.
Every figure has axis labels with units and a one-line caption saying what to read from it. The
page inlines the PNGs as data URIs and uses no script and no external resource, so it opens
offline from any location.
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b",
           "#e377c2", "#7f7f7f", "#bcbd22"]


@dataclass
class Figure:
    name: str  # file stem
    title: str
    caption: str  # one line: what to read from it
    png: bytes


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    _plt().close(fig)
    return buf.getvalue()


def _panels(n: int, width: float = 4.6, height: float = 3.6):
    plt = _plt()
    fig, axes = plt.subplots(1, n, figsize=(max(6.0, width * n), height), squeeze=False)
    return fig, list(axes[0])


def _color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _legend(ax, **kw) -> None:
    """A legend only when something is labelled (matplotlib warns otherwise)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kw)


def _first(res: dict) -> dict:
    return res["results"][0]


# ---------------------------------------------------------------------------------------------
# figures


def fig_offsets(traces) -> Figure:
    plt = _plt()
    fig, axes = _panels(len(traces))
    for ax, (label, res) in zip(axes, traces, strict=True):
        off = res["offsets"]
        edges = np.asarray(off["edges_tokens"], dtype=np.float64)
        layers = off["layers"]
        cmap = plt.get_cmap("viridis")
        counts_all = np.asarray(off["counts_by_layer"], dtype=np.float64).reshape(
            len(layers), -1)
        used = np.flatnonzero(counts_all.sum(axis=0))
        top = int(used[-1]) + 2 if used.shape[0] else 2  # bins up to the longest offset
        for j, (lv, c) in enumerate(zip(layers, counts_all, strict=True)):
            if c.sum() == 0:
                continue
            cdf = np.cumsum(c) / c.sum()
            # edges[i] is the lower edge of bin i: the CDF at the next edge includes it
            x = np.append(edges[1:], edges[-1] * 2)
            ax.step(np.maximum(x[:top], 1), cdf[:top], where="post",
                    color=cmap(j / max(1, len(layers) - 1)), lw=1.0,
                    label=f"layer {lv}" if len(layers) <= 8 else None)
        ax.set_xscale("log")
        ax.set_xlabel("offset from the newest token (tokens)")
        ax.set_ylabel("selected tokens, cumulative (fraction)")
        ax.set_ylim(0, 1.02)
        ax.set_title(label)
        ax.grid(True, alpha=0.3)
        _legend(ax, fontsize=7)
        if len(layers) > 8:
            sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(min(layers), max(layers)))
            fig.colorbar(sm, ax=ax, label="layer (index)")
    return Figure("offset_cdf_by_layer", "Offset CDF by layer",
                  "How far back each layer reads: curves that rise late put the selection in "
                  "distant context, which a recency window cannot serve.", _save(fig))


def fig_heatmap(traces) -> Figure:
    fig, axes = _panels(len(traces), 4.8, 3.8)
    plt = _plt()
    for ax, (label, res) in zip(axes, traces, strict=True):
        r = _first(res)
        rows = r["unique_blocks_by_decode_step_layer"]
        a = np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)
        if a.size == 0:
            a = np.full((1, 1), np.nan)
        im = ax.imshow(a, aspect="auto", origin="lower", interpolation="nearest",
                       cmap="magma")
        ax.set_xlabel("layer (index)")
        ax.set_ylabel("decode step (steps since the request's first)")
        ax.set_title(f"{label} ({r['block_size_tokens']}-token blocks)")
        plt.colorbar(im, ax=ax, label="unique blocks per record (blocks)")
    return Figure("unique_blocks_heatmap", "Unique blocks per decode step x layer",
                  "Where the fetch volume is: bright cells are (step, layer) pairs that touch "
                  "many blocks; vertical bands mean some layers always read more.", _save(fig))


def fig_tokens_per_block(traces) -> Figure:
    fig, axes = _panels(len(traces))
    for ax, (label, res) in zip(axes, traces, strict=True):
        for j, r in enumerate(res["results"]):
            h = np.asarray(r["tokens_per_block_hist"], dtype=np.float64)
            if h.sum() == 0:
                continue
            x = np.arange(h.shape[0])
            ax.plot(x[1:], h[1:] / h.sum(), marker=".", color=_color(j),
                    label=f"{r['block_size_tokens']}-token blocks")
        ax.set_xscale("log")
        ax.set_xlabel("selected tokens in a touched block (tokens)")
        ax.set_ylabel("touched blocks (fraction)")
        ax.set_title(label)
        ax.grid(True, alpha=0.3)
        _legend(ax, fontsize=7)
    return Figure("tokens_per_touched_block", "Tokens per touched block",
                  "How full a fetched block is: mass near 1 token means most of every block "
                  "read is wasted bandwidth at that block size.", _save(fig))


def fig_read_amplification(traces) -> Figure:
    fig, (ax, ax2) = _panels(2)
    for i, (label, res) in enumerate(traces):
        amp = res["read_amplification"]
        rows = amp["by_block_size"]
        ax.plot([r["block_size_tokens"] for r in rows], [r["ratio"] for r in rows],
                marker="o", color=_color(i), label=label)
        what = [w for w in amp["subblock_whatif"] if w["block_size_tokens"] == 64]
        key = "remote_pool_fetch_us_per_record"
        if what and key in what[0]:
            ax2.plot([w["sub_block_tokens"] for w in what], [w[key] for w in what],
                     marker="o", color=_color(i), label=f"{label}: 64-token blocks")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("block size (tokens)")
    ax.set_ylabel("read amplification (x, fetched / selected bytes)")
    ax.set_title("whole-block fetch")
    ax.grid(True, which="both", alpha=0.3)
    _legend(ax, fontsize=7)
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("sub-block size (tokens)")
    tiers = traces[0][1]["read_amplification"].get("tiers")
    ax2.set_ylabel(f"remote fetch / record (us, {tiers})")
    ax2.set_title("sub-block what-if (64-token blocks)")
    ax2.grid(True, which="both", alpha=0.3)
    _legend(ax2, fontsize=7)
    return Figure("read_amplification", "Read amplification vs block size",
                  "Left: bytes moved per useful byte at each block size (1 = only the selected "
                  "tokens). Right: the unloaded fetch time when a 64-token block is read as "
                  "sub-blocks; its minimum is the sub-block size to use.", _save(fig))


def fig_jaccard_iou(traces) -> Figure:
    fig, axes = _panels(1, 7.5, 3.8)
    ax = axes[0]
    for i, (label, res) in enumerate(traces):
        r = _first(res)
        bl = r["by_layer"]
        if bl["step_jaccard_mean"] is not None:
            ax.plot(bl["layers"], bl["step_jaccard_mean"], marker=".", color=_color(i),
                    label=f"{label}: step Jaccard (layer l, step t vs t-1)")
        pairs = r["cross_layer_overlap"]["by_layer_pair"]
        if pairs:
            ax.plot([p["layers"][1] for p in pairs], [p["mean"] for p in pairs], ls="--",
                    marker="x", color=_color(i), label=f"{label}: IoU (layer l-1 vs l, step t)")
    ax.set_xlabel("layer (index)")
    ax.xaxis.set_major_locator(_plt().MaxNLocator(integer=True))
    ax.set_ylabel("mean Jaccard / IoU (fraction)")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    _legend(ax, fontsize=7)
    return Figure("jaccard_iou_by_layer", "Step Jaccard and cross-layer IoU by layer",
                  "Which neighbour predicts a layer's selection: a high solid line favours "
                  "prefetching from the previous step, a high dashed line from the previous "
                  "layer of the same step.", _save(fig))


def fig_reuse(traces) -> Figure:
    fig, axes = _panels(1, 7.0, 3.8)
    ax = axes[0]
    styles = ["-", "--", ":", "-."]
    for i, (label, res) in enumerate(traces):
        for j, r in enumerate(res["results"]):
            cdf = r["temporal_locality"]["reuse_distance_cdf_steps"]
            if not cdf:
                continue
            ax.step([max(c["reuse_distance_steps"], 0.8) for c in cdf], [c["cdf"] for c in cdf],
                    where="post", color=_color(i), ls=styles[j % 4],
                    label=f"{label}, {r['block_size_tokens']}-token blocks")
    ax.set_xscale("log")
    ax.set_xlabel("reuse distance (decode steps since the block was last read)")
    ax.set_ylabel("re-reads, cumulative (fraction)")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    _legend(ax, fontsize=7)
    return Figure("reuse_distance_cdf", "Reuse-distance CDF",
                  "How long a block waits to be read again: the step count where the curve "
                  "reaches 0.9 is how many steps of history a cache must hold for 90 % of "
                  "re-reads.", _save(fig))


def fig_working_set(traces) -> Figure:
    fig, axes = _panels(1, 7.0, 3.8)
    ax = axes[0]
    for i, (label, res) in enumerate(traces):
        for j, r in enumerate(res["results"]):
            ws = r["working_set"]
            w = sorted(int(k) for k in ws)
            mean = [ws[str(k)]["mean"] for k in w]
            ax.plot(w, mean, marker="o", color=_color(i), ls=["-", "--", ":", "-."][j % 4],
                    label=f"{label}, {r['block_size_tokens']}-token blocks")
            ax.fill_between(w, [ws[str(k)]["min"] for k in w], [ws[str(k)]["max"] for k in w],
                            color=_color(i), alpha=0.08)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("window (decode steps)")
    ax.set_ylabel("working set per stream (blocks)")
    ax.grid(True, alpha=0.3)
    _legend(ax, fontsize=7)
    return Figure("working_set", "Working set vs window",
                  "Capacity a stream needs to keep the last W steps resident: a flat curve "
                  "means the selection barely moves, a steep one that it keeps drifting.",
                  _save(fig))


def fig_cache(traces) -> Figure:
    fig, axes = _panels(len(traces), 5.0, 3.8)
    for ax, (label, res) in zip(axes, traces, strict=True):
        for j, r in enumerate(res["results"]):
            sc = r["shared_cache"]
            c = _color(j)
            tag = f"{r['block_size_tokens']}-token"
            if sc["capacity_blocks"]:
                ax.plot(sc["capacity_blocks"], sc["lru_miss_ratio"], color=c,
                        label=f"shared LRU, {tag}")
                ax.plot(sc["opt_capacity_blocks"], sc["opt_miss_ratio"], color=c, ls="--",
                        label=f"shared OPT, {tag}")
            rows = sc.get("per_stream_vs_shared") or []
            if rows:
                ax.plot([x["total_capacity_blocks"] for x in rows],
                        [x["per_stream_lru_miss_ratio"] for x in rows], ls="none", marker="s",
                        color=c, label=f"per-stream LRU x streams, {tag}")
        ax.set_xscale("log")
        ax.set_xlabel("cache capacity, all streams together (blocks)")
        ax.set_ylabel("miss ratio (fraction)")
        ax.set_ylim(0, 1.02)
        sampled = [r["shared_cache"]["sample_rate"] for r in res["results"]]
        note = "" if all(s == 1.0 for s in sampled) else f" (sampled, rate {min(sampled):.3g})"
        ax.set_title(label + note, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        _legend(ax, fontsize=6)
    return Figure("cache_miss_ratio", "Per-stream LRU vs shared LRU and OPT",
                  "Misses at each total capacity: the gap between LRU and OPT is what a "
                  "smarter eviction policy can win; squares above the shared LRU curve mean "
                  "partitioning the cache per stream costs hits.", _save(fig))


def fig_prefix(traces) -> Figure:
    fig, (ax, ax2) = _panels(2)
    for i, (label, res) in enumerate(traces):
        p = res["prefix"]["by_decode_step"]
        if not p["decode_step"]:
            continue
        ax.plot(p["decode_step"], p["intersection_ratio_mean"], color=_color(i),
                label=f"{label}: touched blocks in the prompt prefix")
        ax.plot(p["decode_step"], p["cached_prefix_token_share_mean"], color=_color(i),
                ls="--", label=f"{label}: selected tokens in the cached prefix")
    # hot prefix blocks: the first trace's 16 hottest ids, every trace's share of each
    ids = [h["block_id"] for h in traces[0][1]["prefix"]["hot_prefix_blocks"][:16]]
    w = 0.8 / len(traces)
    for i, (label, res) in enumerate(traces):
        share = {h["block_id"]: h["share_of_records"] for h in res["prefix"]["hot_prefix_blocks"]}
        if ids:
            ax2.bar(np.arange(len(ids)) + i * w, [share.get(b, 0.0) for b in ids], width=w,
                    color=_color(i), label=label)
    if ids:
        ax2.set_xticks(np.arange(len(ids)) + 0.4 - w / 2, [str(b) for b in ids], fontsize=7)
    ax.set_xlabel("decode step (steps since the request's first)")
    ax.set_ylabel("mean over records (fraction)")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    _legend(ax, fontsize=6)
    ax2.set_xlabel("prefix block (id, hottest first)")
    ax2.set_ylabel("records touching it (fraction)")
    ax2.grid(True, axis="y", alpha=0.3)
    _legend(ax2, fontsize=7)
    return Figure("prefix_overlap", "Prefix overlap over decode steps",
                  "How much decoding keeps reading the shared prompt prefix: a high, flat "
                  "line means cached prefix blocks stay hot for the whole decode; right: which "
                  "prefix blocks (block 0 = the attention sink) are read most.", _save(fig))


def fig_tiers(traces) -> Figure:
    from kvtier.analysis.source import TIERS

    fig, (ax, ax2) = _panels(2)
    w = 0.8 / len(traces)
    for i, (label, res) in enumerate(traces):
        t = res["tiers"]
        x = np.arange(len(TIERS)) + i * w
        ax.bar(x, [t[n]["hit_share"] for n in TIERS], width=w, color=_color(i), label=label)
        p50 = [t[n]["latency_us"]["p50"] or 0.0 for n in TIERS]
        p99 = [t[n]["latency_us"]["p99"] or 0.0 for n in TIERS]
        ax2.bar(x, p99, width=w, color=_color(i), alpha=0.35)
        ax2.bar(x, p50, width=w, color=_color(i), label=f"{label} (p50; light = p99)")
    for a in (ax, ax2):
        a.set_xticks(np.arange(len(TIERS)) + 0.4 - w / 2, list(TIERS))
        a.set_xlabel("tier (name)")
        a.grid(True, axis="y", alpha=0.3)
        _legend(a, fontsize=7)
    ax.set_ylabel("block reads served (fraction)")
    ax.set_ylim(0, 1.02)
    ax2.set_ylabel("fetch latency per record (us)")
    ax2.set_yscale("symlog", linthresh=1.0)
    return Figure("tier_breakdown", "Tier breakdown",
                  "Where reads were served and what they cost: pool shares are the misses of "
                  "HBM, and the p99 bars show the tail a decode step waits for.", _save(fig))


def fig_sweeps(traces) -> Figure | None:
    tables, seen = [], set()
    for label, res in traces:  # one table once, even when several analyses carry it
        for sw in res.get("sweeps") or []:
            if sw["source"] not in seen:
                seen.add(sw["source"])
                tables.append((label, sw))
    if not tables:
        return None
    panels = [(label, bs, t) for label, sw in tables for bs, t in sw["block_sizes"].items()]
    fig, axes = _panels(len(panels), 4.8, 3.8)
    for ax, (label, bs, t) in zip(axes, panels, strict=True):
        caps = t["capacity_blocks"]
        order = np.argsort(caps)
        for j, (pol, hr) in enumerate(sorted(t["policies"].items())):
            ys = [hr[k] if hr[k] is not None else np.nan for k in order]
            ax.plot([caps[k] for k in order], ys, marker="o", color=_color(j), label=pol)
        ax.set_xscale("log")
        ax.set_xlabel("capacity (blocks)")
        ax.set_ylabel("hit ratio (fraction)")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{label}: {bs}-token blocks", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        _legend(ax, fontsize=7)
    return Figure("policy_comparison", "Policy comparison (sweeps)",
                  "Hit ratio of each eviction policy by capacity (kvtier sweep): the spread at "
                  "a capacity is what the choice of policy is worth there.", _save(fig))


def figures(traces: list[tuple[str, dict]]) -> list[Figure]:
    figs = [fig_offsets(traces), fig_heatmap(traces), fig_tokens_per_block(traces),
            fig_read_amplification(traces), fig_jaccard_iou(traces), fig_reuse(traces),
            fig_working_set(traces), fig_cache(traces), fig_prefix(traces), fig_tiers(traces)]
    sw = fig_sweeps(traces)
    if sw is not None:
        figs.append(sw)
    return figs


# ---------------------------------------------------------------------------------------------
# the page


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.{digits}g}" if abs(v) < 1e5 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return html.escape(str(v))


def summary_rows(label: str, res: dict) -> list[list[str]]:
    rows = []
    for r in res["results"]:
        rs, tl = r["record_stats"], r["temporal_locality"]
        sc = r["shared_cache"]
        c128 = (r["cache_sim"].get("128") or next(iter(r["cache_sim"].values()), None)) \
            if r["cache_sim"] else None
        rows.append([
            label, _fmt(res["records_analyzed"]), _fmt(res["requests"]), _fmt(res["layers"]),
            _fmt(r["block_size_tokens"]), _fmt(rs["unique_blocks"]["mean"]),
            _fmt(rs["tokens_per_block_mean"]["mean"]), _fmt(r["read_amplification"]["ratio"]),
            _fmt(tl["step_jaccard"]["mean"]), _fmt(r["cross_layer_overlap"]["iou"]["mean"]),
            _fmt(rs["recent_locality"]["mean_block_distance"]["mean"]),
            _fmt(c128["hit_rate"]) + (f" @{c128['capacity_blocks']}" if c128 else ""),
            _fmt(sc["working_set_blocks"]),
        ])
    return rows


HEAD = ["trace", "records", "requests", "layers", "block (tokens)", "unique blocks / record",
        "tokens / block", "read amp.", "step Jaccard", "layer IoU", "mean block distance",
        "per-stream LRU hit rate", "shared working set (blocks)"]

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;
max-width:1400px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ccc;padding:3px 7px;
text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}
figure{margin:1.2em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.9em;color:#444;margin-top:.3em}.meta{font-size:.85em;color:#555}
code{background:#f5f5f5;padding:0 3px}
"""


def render_html(traces: list[tuple[str, dict]], figs: list[Figure], title: str) -> str:
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
             f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             "<p class=\"meta\">Generated by <code>kvtier report</code>; every number is "
             "defined in docs/ANALYSIS.md. Figures are embedded; the page needs no network."
             "</p>", "<h2>Traces</h2><table><tr>"]
    parts += [f"<th>{h}</th>" for h in HEAD]
    parts.append("</tr>")
    for label, res in traces:
        for row in summary_rows(label, res):
            parts.append("<tr>" + "".join(f"<td>{v}</td>" for v in row) + "</tr>")
    parts.append("</table><ul class=\"meta\">")
    for label, res in traces:
        sk = {k: v for k, v in res["skipped"].items() if v}
        parts.append(
            f"<li><b>{html.escape(label)}</b>: {html.escape(str(res.get('trace')))} "
            f"(run {html.escape(str(res.get('run_name')))}, dataset "
            f"{html.escape(str(res.get('dataset')))}, backend "
            f"{html.escape(str(res.get('backend')))}, key mode "
            f"{html.escape(res['settings']['key_mode'])}"
            f"{', step union' if res['settings']['step_union'] else ''})"
            + (f"; skipped {html.escape(str(sk))}" if sk else "") + "</li>")
    parts.append("</ul>")
    for f in figs:
        data = base64.b64encode(f.png).decode("ascii")
        parts.append(f"<h2 id=\"{f.name}\">{html.escape(f.title)}</h2><figure>"
                     f"<img src=\"data:image/png;base64,{data}\" alt=\"{html.escape(f.title)}\">"
                     f"<figcaption>{html.escape(f.caption)}</figcaption></figure>")
    parts.append("</body></html>\n")
    return "".join(parts)


def unique_labels(paths: list[str]) -> list[str]:
    """Short labels for the traces: the directory name, made unique with its parent."""
    names = [Path(p).resolve().name if not Path(p).is_file() else Path(p).resolve().parent.name
             for p in paths]
    out = []
    for i, (p, n) in enumerate(zip(paths, names, strict=True)):
        if names.count(n) > 1:
            par = Path(p).resolve()
            n = f"{par.parent.name}/{n}" if names.count(n) > 1 else n
        if n in out:
            n = f"{n}#{i + 1}"
        out.append(n)
    return out


def write_report(traces: list[tuple[str, dict]], out: str | Path,
                 title: str = "kvtier trace report") -> Path:
    """Write ``out/index.html`` and ``out/<figure>.png``; returns the HTML path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figs = figures(traces)
    for f in figs:
        (out / f"{f.name}.png").write_bytes(f.png)
    page = out / "index.html"
    page.write_text(render_html(traces, figs, title), encoding="utf-8")
    return page
