"""Loader and model-free serving-replay throughput, next to the straightforward baselines.

Writes synthetic files in the real formats to a temp dir (a BurstGPT v1.1 CSV with
``--burstgpt-rows`` rows, a ShareGPT JSON array with ``--sharegpt-convs`` conversations),
then times:

- ``load_burstgpt``, against ``csv.DictReader`` + int() per row (no validation at all);
- ``load_sharegpt``, against ``json.load`` of the whole file (no validation at all);
- ``simulate`` (both engines) over the loaded BurstGPT requests and, when present, the
  shared Mooncake trace.

    .venv/bin/python benchmarks/bench_workloads.py [--burstgpt-rows 1400000]
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from kvtier.runners.datasets import load_burstgpt, load_mooncake, load_sharegpt
from kvtier.runners.serving_sim import StepCostModel, simulate

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def timed(label: str, fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    print(f"{label:<52} {time.perf_counter() - t0:8.2f} s")
    return out


def write_burstgpt(path: Path, rows: int, rng: np.random.Generator) -> None:
    req = rng.integers(0, 3000, rows)
    resp = rng.integers(0, 800, rows)
    ts = np.sort(rng.integers(0, 10 * rows, rows))
    with open(path, "w") as f:
        f.write("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n")
        f.writelines(f"{t},ChatGPT,{a},{b},{a + b},Conversation log\n"
                     for t, a, b in zip(ts.tolist(), req.tolist(), resp.tolist(), strict=True))


def write_sharegpt(path: Path, convs: int, rng: np.random.Generator) -> None:
    data = [{"id": f"c{i}_0", "conversations": [
        {"from": "human" if j % 2 == 0 else "gpt", "value": "word " * int(rng.integers(5, 300))}
        for j in range(int(rng.integers(2, 10)))]} for i in range(convs)]
    path.write_text(json.dumps(data, indent=2))


def naive_burstgpt(path: Path) -> int:
    with open(path, newline="") as f:
        return sum(1 for r in csv.DictReader(f)
                   if int(r["Request tokens"]) or int(r["Response tokens"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--burstgpt-rows", type=int, default=1_400_000,
                    help="rows in the synthetic BurstGPT CSV (BurstGPT_1.csv has ~1.43 M)")
    ap.add_argument("--sharegpt-convs", type=int, default=20_000,
                    help="conversations in the synthetic ShareGPT file")
    ap.add_argument("--batch-size", type=int, default=8, help="serving replay batch size")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    cost = StepCostModel(prefill_s_per_token=2e-5, decode_base_s=0.02, decode_s_per_seq=1e-3,
                         decode_s_per_ctx_token=1e-7)
    with tempfile.TemporaryDirectory() as tmp:
        bpath, spath = Path(tmp) / "BurstGPT_1.csv", Path(tmp) / "sharegpt.json"
        write_burstgpt(bpath, args.burstgpt_rows, rng)
        write_sharegpt(spath, args.sharegpt_convs, rng)
        print(f"BurstGPT {args.burstgpt_rows} rows ({bpath.stat().st_size / 1e6:.0f} MB), "
              f"ShareGPT {args.sharegpt_convs} conversations "
              f"({spath.stat().st_size / 1e6:.0f} MB)")
        wl = timed("load_burstgpt (validated, Request objects)", load_burstgpt, bpath)
        timed("baseline: csv.DictReader + int() per row", naive_burstgpt, bpath)
        timed("load_burstgpt limit=64", load_burstgpt, bpath, 64)
        timed("load_sharegpt (streamed, validated)", load_sharegpt, spath)
        timed("baseline: json.load", lambda: json.loads(spath.read_text()))
        timed("load_sharegpt limit=64", load_sharegpt, spath, 64)
        for engine in ("reference", "per_request"):
            timed(f"simulate {len(wl.requests)} BurstGPT requests, {engine}", simulate,
                  wl.requests, cost, batch_size=args.batch_size, max_new_tokens=256,
                  engine=engine)
    if (SHARED / "mooncake").is_dir():
        mc = load_mooncake(SHARED / "mooncake")
        for engine in ("reference", "per_request"):
            timed(f"simulate Mooncake trace ({len(mc.requests)} requests), {engine}",
                  simulate, mc.requests, cost, batch_size=args.batch_size,
                  max_new_tokens=256, engine=engine)


if __name__ == "__main__":
    main()
