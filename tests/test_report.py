"""``kvtier report`` and the notebook API: every figure present, labelled and captioned, the
page self-contained, rendered by a real headless Chromium without console errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from tracegen import make_trace

from kvtier.cli import main

FIGURES = ["offset_cdf_by_layer", "unique_blocks_heatmap", "tokens_per_touched_block",
           "read_amplification", "jaccard_iou_by_layer", "reuse_distance_cdf", "working_set",
           "cache_miss_ratio", "prefix_overlap", "tier_breakdown", "policy_comparison"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Two traces (HBM-only and its sim replay), a sweep table and the report of both."""
    root = tmp_path_factory.mktemp("rep")
    hbm = root / "hbm"
    make_trace(hbm, requests=4, layers=3, new_tokens=8, topk=48, prompt_len=300)
    assert main(["replay", str(hbm), "--out", str(root / "sim"), "--hbm-blocks", "64",
                 "--no-progress"]) == 0
    assert main(["sweep", str(hbm), "--out", str(root / "sw.csv"), "--capacities", "16blocks,64blocks,256",
                 "--policies", "lru,fifo,belady", "--no-progress"]) == 0
    out = root / "report"
    assert main(["report", str(hbm), str(root / "sim"), "--out", str(out), "--sweep",
                 str(root / "sw.csv"), "--block-sizes", "16,64", "--no-progress"]) == 0
    return root, out


def test_every_figure_is_written_and_inlined(built):
    _, out = built
    page = (out / "index.html").read_text()
    for name in FIGURES:
        assert (out / f"{name}.png").stat().st_size > 5000, name
        assert f'id="{name}"' in page
    imgs = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(imgs) == len(FIGURES)
    assert len(re.findall(r"<figcaption>[^<]{40,}</figcaption>", page)) == len(FIGURES)
    # self-contained: no scripts, no external resource
    assert "<script" not in page and not re.search(r'(src|href)="(https?:|//)', page)
    for label in ("hbm", "sim"):
        res = json.loads((out / f"{label}.analysis.json").read_text())
        assert [r["block_size_tokens"] for r in res["results"]] == [16, 64]


def test_every_axis_is_labelled_with_a_unit(built, monkeypatch):
    from kvtier.analysis import report

    root, out = built
    traces = [(n, json.loads((out / f"{n}.analysis.json").read_text())) for n in ("hbm", "sim")]
    traces[0][1]["sweeps"] = [report_sweep(root)]
    seen = []

    def keep(fig):
        seen.append(fig)
        return b"png"

    monkeypatch.setattr(report, "_save", keep)
    figs = report.figures(traces)
    assert [f.name for f in figs] == FIGURES
    for fig, f in zip(seen, figs, strict=True):
        assert f.caption and f.title
        for ax in fig.axes:
            if ax.get_label() == "<colorbar>":
                assert ax.get_ylabel() or ax.get_xlabel()
                continue
            for lab in (ax.get_xlabel(), ax.get_ylabel()):
                assert re.search(r"\(.+\)", lab), f"{f.name}: axis label {lab!r} without a unit"


def report_sweep(root):
    from kvtier.analysis.tiers import sweep_table

    return sweep_table(root / "sw.csv")


def test_several_traces_side_by_side_and_analysis_reuse(built, tmp_path, capsys):
    _, out = built
    again = tmp_path / "again"
    assert main(["report", str(out / "hbm.analysis.json"), str(out / "sim.analysis.json"),
                 "--label", "A", "--label", "B", "--out", str(again), "--no-progress"]) == 0
    page = (again / "index.html").read_text()
    assert "<td>A</td>" in page and "<td>B</td>" in page
    # the sweep table travels inside the saved analyses (drawn once, not once per trace)
    assert page.count('id="policy_comparison"') == 1
    assert main(["report", str(out / "hbm.analysis.json"), "--label", "x", "--label", "y",
                 "--out", str(tmp_path / "r2")]) == 2
    assert "--label given 2 times for 1 traces" in capsys.readouterr().err


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


CHECK = """<script>
window.addEventListener("load", function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++;
  var p = document.createElement("pre"); p.id = "kvtier-check";
  p.textContent = "images=" + imgs.length + " loaded=" + ok + " figures=" +
    document.querySelectorAll("figure figcaption").length;
  document.body.appendChild(p);
});
</script>"""


def _render(browser: str, page, profile) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
             "--virtual-time-budget=10000", "--dump-dom", page.as_uri()]
    return subprocess.run([browser, *flags], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(sys.platform != "linux", reason="headless Chromium check runs on Linux")
def test_the_page_renders_in_headless_chromium(built, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("Chromium not found: `apt-get install -y chromium` (bash .ci/run installs "
                    "it when it runs as root)")
    _, out = built
    # the page as shipped: no console message at all (it has no script; a broken image or a
    # blocked resource would log one)
    res = _render(browser, out / "index.html", tmp_path / "p1")
    assert res.returncode == 0, res.stderr[-2000:]
    console = [ln for ln in res.stderr.splitlines() if ":CONSOLE" in ln]
    assert not console, console
    assert res.stdout.count("<figure>") == len(FIGURES)
    # a copy with a check script: every image decoded
    probe = tmp_path / "probe.html"
    probe.write_text((out / "index.html").read_text().replace("</body>", CHECK + "</body>"))
    res = _render(browser, probe, tmp_path / "p2")
    m = re.search(r'id="kvtier-check">images=(\d+) loaded=(\d+) figures=(\d+)', res.stdout)
    assert m, res.stdout[-500:] + res.stderr[-2000:]
    n = len(FIGURES)
    assert (int(m.group(1)), int(m.group(2)), int(m.group(3))) == (n, n, n)
    assert not [ln for ln in res.stderr.splitlines() if ":CONSOLE" in ln]


# -- the notebook API ---------------------------------------------------------------------------


def test_open_trace(built, tmp_path, monkeypatch):
    import kvtier
    from kvtier.sim.access import read_access_stream

    root, _ = built
    t = kvtier.open_trace(root / "hbm")
    assert t.meta["run_name"] and t.summary["records"] > 0
    tb = t.records(["request_id", "layer_id", "selected_token_pos", "kv_fetch.hbm.hit_blocks"])
    assert tb.column_names == ["request_id", "layer_id", "selected_token_pos",
                               "kv_fetch.hbm.hit_blocks"]
    assert tb.num_rows == t.summary["records"]
    s = t.access_stream()
    ref = read_access_stream(root / "hbm")
    assert np.array_equal(s.pos, ref.pos) and len(s) == tb.num_rows
    a = t.analyze(block_sizes=(32,), lru_caps=(8,))
    assert a["results"][0]["block_size_tokens"] == 32 and set(a["results"][0]["cache_sim"]) == {"8"}
    r = t.replay(backend="sim", policy="fifo", out=tmp_path / "rp", hbm_blocks=16)
    assert isinstance(r, kvtier.analysis.api.Trace)
    assert r.analyze()["tiers"]["replayed"] is True
    page = t.report(tmp_path / "rep", r, labels=["hbm", "fifo"])
    assert page.is_file() and "fifo" in page.read_text()
    pd = pytest.importorskip("pandas")
    df = t.to_pandas(["request_id", "step_idx"])
    assert isinstance(df, pd.DataFrame) and len(df) == tb.num_rows
    monkeypatch.setitem(sys.modules, "polars", None)
    with pytest.raises(ImportError, match=r"pip install 'kvtier\[frames\]'"):
        t.to_polars()
