# Shared by scripts/run_trace_*.sh: turn the environment into kvtier run flags and launch,
# under torchrun when MP/NPROC > 1. Sourced, not executed.
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3

run_kvtier() {
    local dataset="$1"
    shift
    local args=(run "$dataset" --limit "${LIMIT:-64}")
    [ -n "${CKPT_PATH:-}" ] && args+=(--ckpt-path "$CKPT_PATH")
    [ -n "${CONFIG:-}" ] && args+=(--config "$CONFIG")
    [ -n "${DATAS_DIR:-}" ] && args+=(--data-dir "$DATAS_DIR")
    [ -n "${MAX_PROMPT_TOKENS:-}" ] && args+=(--max-prompt-tokens "$MAX_PROMPT_TOKENS")
    local nproc="${NPROC:-${MP:-1}}"
    if [ "$nproc" -gt 1 ]; then
        exec "$PY" -m torch.distributed.run --standalone --nproc-per-node "$nproc" \
            -m kvtier.cli "${args[@]}" "$@"
    fi
    exec "$PY" -m kvtier.cli "${args[@]}" "$@"
}
