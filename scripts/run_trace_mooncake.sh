#!/usr/bin/env bash
# Trace mooncake with kvtier run (run from the repo root): a serving replay of a Mooncake
# FAST'25 trace (kvcache-ai/Mooncake FAST25-release/traces/*.jsonl).
# Environment:
#   CKPT_PATH          converted checkpoint dir (unset: seeded random weights of CONFIG)
#   CONFIG             model config json or builtin name (default: 671B_v3.2 with a checkpoint, demo without)
#   DATAS_DIR          where datasets live (default: data/huggingface)
#   LIMIT              requests to read (default 64)
#   MAX_PROMPT_TOKENS  skip longer prompts (default: max_seq_len - max_new_tokens)
#   MP / NPROC         tensor-parallel ranks; > 1 runs under torchrun
# Extra arguments are passed to kvtier run (e.g. --mooncake-jsonl FILE --time-scale 0.1 --batch-size 4,
# or --model-free --decode-base-s 0.02 to replay without a model).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_run_common.sh
run_kvtier mooncake "$@"
