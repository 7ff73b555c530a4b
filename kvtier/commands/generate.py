"""``kvtier generate``: the reference demo's batch / interactive generation, optionally traced.

torchrun-aware: WORLD_SIZE / RANK / LOCAL_RANK select the shard ``model{rank}-mp{world}``;
the process group uses gloo on CPU and nccl on CUDA. Only rank 0 reads the terminal, prints
and writes the trace; interactive input is broadcast to the other ranks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from kvtier.trace.settings import add_trace_args

#: the reference generate.py's seed
SEED = 33377335


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text with a converted checkpoint (batch file or interactive chat)",
        description="Generate with DeepSeek-V3.2-Exp like the reference generate.py: one "
        "prefill of the shortest prompt, then one-token decode steps. With --trace-enable "
        "every decode step x request x layer's indexer top-k is recorded. Run under "
        "torchrun --nproc-per-node N for a checkpoint converted with --model-parallel N.",
    )
    p.add_argument("--ckpt-path", required=True, metavar="DIR",
                   help="directory with model{rank}-mp{N}.safetensors and tokenizer files")
    p.add_argument("--config", default=None, metavar="JSON",
                   help="model config json or builtin name (tiny, demo, 671B_v3.2; default "
                        "671B_v3.2)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--input-file", metavar="FILE",
                      help="prompts separated by blank lines; run in batches of the config's "
                           "max_batch_size, each through the chat template")
    mode.add_argument("--interactive", action="store_true",
                      help="chat on the terminal; '/clear' starts a new conversation, '/exit' quits")
    p.add_argument("--max-new-tokens", type=int, default=200, metavar="N",
                   help="maximum tokens generated per prompt (default 200)")
    p.add_argument("--temperature", type=float, default=0.6, metavar="T",
                   help="sampling temperature; 0 is greedy (default 0.6)")
    p.add_argument("--max-seq-len", type=int, default=None, metavar="N",
                   help="override the config's max_seq_len (KV cache length; changes YaRN "
                        "when crossing original_seq_len)")
    p.add_argument("--device", default=None,
                   help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--trace-enable", action="store_true",
                   help="record the indexer's top-k of every decode step and layer")
    p.add_argument("--trace-out", default="traces/generate", metavar="DIR",
                   help="trace output directory (default traces/generate)")
    p.add_argument("--trace-run-name", default="generate", metavar="NAME",
                   help="run_name field of the trace records (default 'generate')")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing trace in --trace-out")
    add_trace_args(p)
    p.set_defaults(func=run)


def split_prompts(text: str) -> list[str]:
    """Prompts of an input file: blocks separated by blank lines, stripped, empty ones dropped."""
    import re

    return [b.strip() for b in re.split(r"\n\s*\n", text) if b.strip()]


def _check(args: argparse.Namespace) -> Any:
    """Validate flags before any model is built; return the TraceSettings."""
    from kvtier.cli import CLIError
    from kvtier.trace.settings import TraceSettings

    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise CLIError(f"--temperature must be >= 0, got {args.temperature}")
    if args.max_seq_len is not None and args.max_seq_len < 2:
        raise CLIError(f"--max-seq-len must be >= 2, got {args.max_seq_len}")
    if not Path(args.ckpt_path).is_dir():
        raise CLIError(f"--ckpt-path: {args.ckpt_path} is not a directory")
    if args.input_file is not None and not Path(args.input_file).is_file():
        raise CLIError(f"--input-file: {args.input_file} not found")
    try:
        return TraceSettings.from_args(args)
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def _make_tracer(args: argparse.Namespace, settings: Any, bundle: Any) -> Any:
    """A kvtier Tracer (HBM-only backend; a no-op on ranks other than 0), or None when disabled."""
    if not args.trace_enable:
        return None
    from kvtier.cli import CLIError
    from kvtier.trace.tracer import Tracer, kv_bytes_per_token

    margs = bundle.args
    bpt = kv_bytes_per_token(margs.kv_lora_rank, margs.qk_rope_head_dim, margs.index_head_dim)
    config = {
        "command": "generate",
        "ckpt_path": str(args.ckpt_path),
        "model_config_file": str(bundle.config_path),
        "model": margs.to_dict(),
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "device": bundle.device,
    }
    try:
        return Tracer(
            settings, args.trace_out, run_name=args.trace_run_name, dataset="generate",
            kv_bytes_per_token=bpt, rank=bundle.rank, world_size=bundle.world_size,
            config=config, force=args.force,
        )  # fmt: skip
    except (ValueError, FileExistsError) as exc:
        raise CLIError(f"--trace-out: {exc}") from None


def _finish_trace(tracer: Any, args: argparse.Namespace, rank: int) -> None:
    """Flush the trace; the tracer writes summary.json itself (rank 0)."""
    tracer.close()
    if rank == 0:
        print(f"trace written to {args.trace_out}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from kvtier.cli import CLIError

    settings = _check(args)
    from kvtier.model.tokenizer import TokenizerError
    from kvtier.runners.model_setup import load_model

    try:
        bundle = load_model(args.config, args.ckpt_path, device=args.device, seed=SEED,
                            max_seq_len=args.max_seq_len, quiet=True)
    except (ValueError, TokenizerError) as exc:  # config, checkpoint, TP-size mismatches
        raise CLIError(str(exc)) from None
    tracer = _make_tracer(args, settings, bundle)
    try:
        if args.interactive:
            _interactive(args, bundle, tracer, settings)
        else:
            _batch(args, bundle, tracer, settings)
    finally:
        if tracer is not None:
            _finish_trace(tracer, args, bundle.rank)
        _shutdown(bundle)
    return 0


def _generate(args, bundle, tracer, settings, prompts: list[list[int]], names: list[str]) -> list[list[int]]:
    """Generate (traced when ``tracer``): the requests get the trace's next integer ids and
    ``names`` (their sample ids: input-file stem and index, or conversation and turn) go to
    requests.jsonl."""
    from kvtier.cli import CLIError
    from kvtier.model.generate import generate
    from kvtier.trace.tracer import WithRequestInfo

    first = tracer.next_request_id if tracer is not None else 0
    ids = list(range(first, first + len(prompts)))
    if tracer is not None:
        tracer = WithRequestInfo(tracer, [{"sample_id": n} for n in names])
    try:
        return generate(
            bundle.model, prompts, args.max_new_tokens, bundle.tokenizer.eos_id,
            temperature=args.temperature, tracer=tracer, request_ids=ids,
            sync_cuda=settings.sync_cuda,
        )  # fmt: skip
    except ValueError as exc:  # prompt longer than max_seq_len, too many prompts, ...
        raise CLIError(str(exc)) from None


def _batch(args, bundle, tracer, settings) -> None:
    from kvtier.cli import CLIError

    text = Path(args.input_file).read_text(encoding="utf-8")
    prompts = split_prompts(text)
    if not prompts:
        raise CLIError(f"--input-file: {args.input_file} holds no prompt")
    tok = bundle.tokenizer
    size = bundle.args.max_batch_size
    stem = Path(args.input_file).stem
    for start in range(0, len(prompts), size):
        chunk = prompts[start : start + size]
        tokens = [tok.chat_prompt(p) for p in chunk]
        ids = [f"{stem}-{start + i}" for i in range(len(chunk))]
        outs = _generate(args, bundle, tracer, settings, tokens, ids)
        if bundle.rank == 0:
            for prompt, out in zip(chunk, outs, strict=True):
                print("Prompt:", prompt)
                print("Completion:", tok.decode(out))
                print()


def _read_line(bundle) -> str | None:
    """Rank 0 reads a line (None at EOF) and broadcasts it to the other ranks."""
    line: str | None = None
    if bundle.rank == 0:
        try:
            line = input(">>> ")
        except EOFError:
            line = None
    if bundle.world_size > 1:
        import torch.distributed as dist

        box = [line]
        dist.broadcast_object_list(box, src=0)
        line = box[0]
    return line


def _interactive(args, bundle, tracer, settings) -> None:
    tok = bundle.tokenizer
    messages: list[dict] = []
    conversation, turn = 0, 0
    while True:
        line = _read_line(bundle)
        if line is None or line.strip() == "/exit":
            break
        if line.strip() == "/clear":
            messages.clear()
            conversation, turn = conversation + 1, 0
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        tokens = tok.apply_chat(messages)
        try:
            out = _generate(args, bundle, tracer, settings, [tokens], [f"chat{conversation}-{turn}"])[0]
        except Exception as exc:  # keep the session alive: report, drop the turn
            messages.pop()
            if bundle.rank == 0:
                print(f"error: {exc}", file=sys.stderr)
            continue
        completion = tok.decode(out)
        if bundle.rank == 0:
            print(completion)
        messages.append({"role": "assistant", "content": completion})
        turn += 1


def _shutdown(bundle) -> None:
    if bundle.world_size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
