"""``kvtier run ruler|longbench-v2|sharegpt|burstgpt|mooncake|azure``: trace the model on a
workload.

Loads the dataset from local files, tokenizes with the model's tokenizer, skips prompts that
do not fit, runs ``generate`` with the tracer and writes ``trace_steps.jsonl``,
``summary.json`` and ``run_meta.json``. BurstGPT, Mooncake and Azure are live serving
replays (arrivals, FIFO queue, batches); ``--model-free`` replays them without a model from
a step cost model.
torch is imported only when the command runs a model.
"""

from __future__ import annotations

import argparse

from kvtier.commands import nonneg_float, nonneg_int, positive_int
from kvtier.trace.settings import add_trace_args

DATASETS = ("ruler", "longbench-v2", "sharegpt", "burstgpt", "mooncake", "azure")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="trace the model on RULER, LongBench v2, ShareGPT, BurstGPT, Mooncake or Azure",
        description="Run a workload through the DSA model with tracing. Writes "
        "outputs/<dataset>_<timestamp>/ (or --trace-out) with trace_steps.jsonl, summary.json "
        "and run_meta.json. Without --ckpt-path the model has seeded random weights. "
        "burstgpt, mooncake and azure are serving replays of their arrival traces (add "
        "--model-free to replay them from a step cost model, without a model).",
    )
    p.add_argument("dataset", choices=DATASETS,
                   help="workload to run: ruler, longbench-v2, sharegpt (prompts); burstgpt, "
                        "mooncake (Mooncake FAST'25 JSONL), azure (Azure LLM inference 2023 "
                        "CSV) (serving replays of arrival traces)")
    m = p.add_argument_group("model")
    m.add_argument("--ckpt-path", default=None, metavar="DIR",
                   help="converted checkpoint directory (model{rank}-mp{world}.safetensors); "
                        "omitted: seeded random weights of --config")
    m.add_argument("--config", default=None, metavar="JSON|NAME",
                   help="model config json or builtin name (demo, tiny, 671B_v3.2; default: "
                        "671B_v3.2 with --ckpt-path, demo without); --model-free takes its "
                        "max_seq_len for the prompt filter")
    m.add_argument("--device", default=None,
                   help="torch device (default: cuda when available, else cpu)")
    m.add_argument("--max-seq-len", type=positive_int, default=None, metavar="N",
                   help="override the config's max_seq_len (context window)")
    m.add_argument("--seed", type=int, default=0,
                   help="seed of random weights, synthetic prompts and sampling (default 0)")
    m.add_argument("--temperature", type=nonneg_float, default=0.0,
                   help="sampling temperature; 0 = greedy (default 0)")

    r = p.add_argument_group("run")
    r.add_argument("--limit", type=nonneg_int, default=64, metavar="N",
                   help="read at most N requests from the dataset (default 64; 0 = all)")
    r.add_argument("--max-new-tokens", type=positive_int, default=64, metavar="N",
                   help="generation cap per request (serving replays: min(the trace's "
                        "response length, N); default 64)")
    r.add_argument("--batch-size", type=positive_int, default=1, metavar="N",
                   help="requests per generate() batch (default 1)")
    r.add_argument("--max-prompt-tokens", type=positive_int, default=None, metavar="N",
                   help="skip (and count) prompts longer than N tokens (default: "
                        "max_seq_len - max_new_tokens)")
    r.add_argument("--trace-out", default=None, metavar="DIR",
                   help="output directory (default: outputs/<dataset>_<timestamp>)")
    r.add_argument("--run-name", default=None,
                   help="run name recorded in every trace record (default: the output "
                        "directory's name)")
    r.add_argument("--force", action="store_true",
                   help="overwrite an earlier run (trace, summary, serving log) in the output "
                        "directory")
    r.add_argument("--no-warmup", action="store_true",
                   help="skip the throw-away traced warm-up (one prefill + one decode step "
                        "on the first prompt) that runs before the first measured batch; "
                        "without it one-time start-up costs land in the first batch's step "
                        "times and serving latencies")

    b = p.add_argument_group("KV backend")
    b.add_argument("--backend", choices=("hbm", "sim"), default="hbm",
                   help="hbm: every selected block is an HBM hit; sim: the simpy tiered "
                        "emulator (default hbm)")
    b.add_argument("--tiers", default="memfabric", metavar="PRESET|FILE",
                   help="tier config for --backend sim: preset (memfabric, mooncake) or "
                        ".toml/.json file (default memfabric)")
    b.add_argument("--policy", default="lru",
                   help="HBM eviction policy for --backend sim (lru, fifo, lfu, arc, s3fifo, "
                        "distance, dsa_aware, module:Class; default lru)")
    b.add_argument("--hbm-blocks", type=positive_int, default=None, metavar="N",
                   help="HBM capacity in blocks for --backend sim (default: the tier config's)")

    d = p.add_argument_group("datasets")
    d.add_argument("--data-dir", default=None, metavar="DIR",
                   help="where datasets are looked up and extracted (default: $DATAS_DIR, "
                        "else <repo>/data/huggingface)")
    d.add_argument("--ruler-tgz", default=None, metavar="FILE|NAME",
                   help="RULER tarball path, or its name under the data dir (default "
                        "data_debug.tgz); an extracted directory also works")
    d.add_argument("--ruler-tasks", default=None, metavar="T1,T2",
                   help="RULER: keep only these tasks (comma-separated)")
    d.add_argument("--ruler-lengths", default=None, metavar="L1,L2",
                   help="RULER: keep only these lengths (comma-separated, e.g. 4096)")
    d.add_argument("--lbv2-json", default=None, metavar="FILE",
                   help="LongBench v2 data.json (default: found under the data dir)")
    d.add_argument("--lbv2-length", choices=("short", "medium", "long"), default=None,
                   help="LongBench v2: keep one length category")
    d.add_argument("--lbv2-template", default="0shot",
                   choices=("0shot", "0shot_no_context", "0shot_cot"),
                   help="LongBench v2 prompt template (default 0shot)")
    d.add_argument("--sharegpt-json", default=None, metavar="FILE",
                   help="ShareGPT json (default: ShareGPT_V3_unfiltered_cleaned_split.json "
                        "under the data dir)")
    d.add_argument("--sharegpt-turn-mode", choices=("full", "per_user_turn"), default="full",
                   help="full: one request per conversation; per_user_turn: one per user "
                        "turn with the conversation so far (default full)")
    d.add_argument("--burstgpt-csv", default=None, metavar="FILE",
                   help="BurstGPT CSV (6- or 8-column layout; default: found under the data dir)")
    d.add_argument("--burstgpt-model", default=None, metavar="NAME",
                   help="BurstGPT: keep rows of this Model only (e.g. GPT-4)")
    d.add_argument("--mooncake-jsonl", default=None, metavar="FILE",
                   help="Mooncake FAST'25 trace (e.g. synthetic_trace.jsonl; default: found "
                        "under the data dir)")
    d.add_argument("--azure-csv", default=None, metavar="FILE",
                   help="Azure LLM inference trace CSV (e.g. AzureLLMInferenceTrace_code.csv; "
                        "default: found under the data dir)")

    s = p.add_argument_group("serving replay (burstgpt, mooncake, azure)")
    s.add_argument("--time-scale", type=nonneg_float, default=1.0, metavar="X",
                   help="multiply inter-arrival times by X (0.1 = 10x the rate; 0 = all at "
                        "once; default 1)")
    s.add_argument("--arrivals", choices=("burstgpt", "mooncake", "azure"), default="burstgpt",
                   help="deprecated: 'burstgpt --arrivals mooncake|azure --arrivals-file FILE' "
                        "is 'mooncake --mooncake-jsonl FILE' / 'azure --azure-csv FILE'")
    s.add_argument("--arrivals-file", default=None, metavar="FILE",
                   help="deprecated, with --arrivals")
    s.add_argument("--model-free", action="store_true",
                   help="no model: simulate service times from the step cost model below "
                        "(required: --cost-from-trace or a non-zero cost flag)")
    s.add_argument("--cost-from-trace", default=None, metavar="DIR",
                   help="fit the decode cost terms to a recorded trace's step times (its "
                        "first step is left out if it was recorded without a warm-up)")
    s.add_argument("--prefill-base-s", type=nonneg_float, default=0.0, metavar="S",
                   help="cost model: seconds per batched prefill (default 0)")
    s.add_argument("--prefill-s-per-token", type=nonneg_float, default=0.0, metavar="S",
                   help="cost model: prefill seconds per prompt token (default 0)")
    s.add_argument("--decode-base-s", type=nonneg_float, default=0.0, metavar="S",
                   help="cost model: seconds per decode step (default 0)")
    s.add_argument("--decode-s-per-seq", type=nonneg_float, default=0.0, metavar="S",
                   help="cost model: decode seconds per active sequence (default 0)")
    s.add_argument("--decode-s-per-ctx-token", type=nonneg_float, default=0.0, metavar="S",
                   help="cost model: decode seconds per context token (default 0)")
    add_trace_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvtier.cli import CLIError
    from kvtier.runners.launch import RunError, launch

    try:
        return launch(args)
    except RunError as exc:
        raise CLIError(str(exc)) from None
