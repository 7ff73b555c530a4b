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
#: --max-new-tokens without --forced-ids (the reference generate.py's default)
DEFAULT_MAX_NEW_TOKENS = 200


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
    mode.add_argument("--input-ids", metavar="JSONL",
                      help="prompts as raw token ids: one JSON list of ints per line (blank "
                           "lines skipped), fed as they are (no chat template, no BOS added); "
                           "run in batches of max_batch_size")
    mode.add_argument("--interactive", action="store_true",
                      help="chat on the terminal; '/clear' starts a new conversation, '/exit' quits")
    p.add_argument("--forced-ids", metavar="JSONL",
                   help="teacher forcing: one JSON list of token ids per line, the N-th line "
                        "for the N-th prompt of --input-file/--input-ids; those ids are fed "
                        "as the completion instead of samples, so the decode steps (and the "
                        "trace) are exactly those of the implementation that decoded them. "
                        "Each row stops after its forced ids unless --max-new-tokens asks for "
                        "more (then it samples on). An EOS id may only be a list's last id")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="maximum tokens generated per prompt (default 200; with --forced-ids "
                        "default: each prompt's forced ids, and N must cover the longest)")
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


def read_id_lists(path: str, flag: str) -> list[tuple[int, list[int]]]:
    """(line number, ids) of each non-blank line of a JSONL file of token-id lists; a bad
    file raises CLIError naming the flag, file and line."""
    import json

    from kvtier.cli import CLIError

    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CLIError(f"{flag}: {path} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CLIError(f"{flag}: cannot read {path}: {exc}") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            ids = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CLIError(f"{flag}: {path} line {n}: invalid JSON ({exc.msg})") from None
        if not isinstance(ids, list) or not ids:
            got = "an empty list" if ids == [] else type(ids).__name__
            raise CLIError(f"{flag}: {path} line {n}: expected a non-empty JSON list of token "
                           f"ids, got {got}")  # fmt: skip
        bad = next((i for i, t in enumerate(ids) if type(t) is not int or t < 0), None)
        if bad is not None:
            raise CLIError(f"{flag}: {path} line {n}: token {bad} is {ids[bad]!r}, not a "
                           "non-negative integer")  # fmt: skip
        rows.append((n, ids))
    if not rows:
        raise CLIError(f"{flag}: {path} holds no token ids")
    return rows


def _check_ids(args: argparse.Namespace, vocab_size: int, n_prompts: int | None) -> None:
    """Token ranges against the config and the pairing of --forced-ids with the prompts."""
    from kvtier.cli import CLIError

    for flag, path, rows in (("--input-ids", args.input_ids, args.prompt_ids),
                             ("--forced-ids", args.forced_ids, args.forced)):  # fmt: skip
        for n, ids in rows or []:
            big = next((i for i, t in enumerate(ids) if t >= vocab_size), None)
            if big is not None:
                raise CLIError(f"{flag}: {path} line {n}: token {big} is {ids[big]}, outside "
                               f"the config's vocab_size {vocab_size}")  # fmt: skip
    if args.forced is not None and n_prompts is not None and len(args.forced) != n_prompts:
        raise CLIError(f"--forced-ids: {args.forced_ids} has {len(args.forced)} id lists for "
                       f"{n_prompts} prompts; give one line per prompt")  # fmt: skip
    if args.forced is not None and args.max_new_tokens is not None:
        n, ids = max(args.forced, key=lambda r: len(r[1]))
        if len(ids) > args.max_new_tokens:
            raise CLIError(f"--max-new-tokens {args.max_new_tokens} is shorter than the "
                           f"{len(ids)} forced ids of {args.forced_ids} line {n}")  # fmt: skip


def _check(args: argparse.Namespace) -> Any:
    """Validate flags before any model is built; return the TraceSettings."""
    from kvtier.cli import CLIError
    from kvtier.trace.settings import TraceSettings

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise CLIError(f"--temperature must be >= 0, got {args.temperature}")
    if args.max_seq_len is not None and args.max_seq_len < 2:
        raise CLIError(f"--max-seq-len must be >= 2, got {args.max_seq_len}")
    if not Path(args.ckpt_path).is_dir():
        raise CLIError(f"--ckpt-path: {args.ckpt_path} is not a directory")
    if args.input_file is not None and not Path(args.input_file).is_file():
        raise CLIError(f"--input-file: {args.input_file} not found")
    if args.forced_ids is not None and args.interactive:
        raise CLIError("--forced-ids needs --input-file or --input-ids (not --interactive)")
    args.prompt_ids = read_id_lists(args.input_ids, "--input-ids") if args.input_ids else None
    args.forced = read_id_lists(args.forced_ids, "--forced-ids") if args.forced_ids else None
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
        # None with --forced-ids: each row runs for its forced ids
        "max_new_tokens": args.max_new_tokens or (None if args.forced else DEFAULT_MAX_NEW_TOKENS),
        "input_ids": args.input_ids,
        "forced_ids": args.forced_ids,
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
    from kvtier.model.args import ModelArgs
    from kvtier.model.tokenizer import TokenizerError
    from kvtier.runners.model_setup import load_model, resolve_config

    prompts = None
    if args.input_file is not None:
        prompts = split_prompts(Path(args.input_file).read_text(encoding="utf-8"))
        if not prompts:
            raise CLIError(f"--input-file: {args.input_file} holds no prompt")
    try:  # token ids against the config before the (slow) model load
        margs = ModelArgs.from_json(resolve_config(args.config, args.ckpt_path))
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    n_prompts = len(prompts) if prompts is not None else (
        len(args.prompt_ids) if args.prompt_ids is not None else None)  # fmt: skip
    _check_ids(args, margs.vocab_size, n_prompts)
    try:
        bundle = load_model(args.config, args.ckpt_path, device=args.device, seed=SEED,
                            max_seq_len=args.max_seq_len, quiet=True)
    except (ValueError, TokenizerError) as exc:  # config, checkpoint, TP-size mismatches
        raise CLIError(str(exc)) from None
    tokens = None if args.interactive else _prompt_tokens(args, bundle, prompts)
    if args.forced is not None:
        _check_forced(args, bundle, tokens)
    tracer = _make_tracer(args, settings, bundle)
    try:
        if args.interactive:
            _interactive(args, bundle, tracer, settings)
        else:
            _batch(args, bundle, tracer, settings, prompts, tokens)
    finally:
        if tracer is not None:
            _finish_trace(tracer, args, bundle.rank)
        _shutdown(bundle)
    return 0


def _generate(args, bundle, tracer, settings, prompts: list[list[int]], names: list[str],
              forced: list[list[int]] | None = None) -> list[list[int]]:
    """Generate (traced when ``tracer``): the requests get the trace's next integer ids and
    ``names`` (their sample ids: input-file stem and index, or conversation and turn) go to
    requests.jsonl. ``forced``: per-prompt ids fed as the completion (teacher forcing); each
    row then stops after them unless --max-new-tokens asks for more."""
    from kvtier.cli import CLIError
    from kvtier.model.generate import generate
    from kvtier.trace.tracer import WithRequestInfo

    first = tracer.next_request_id if tracer is not None else 0
    ids = list(range(first, first + len(prompts)))
    if tracer is not None:
        tracer = WithRequestInfo(tracer, [{"sample_id": n} for n in names])
    max_new: int | list[int] = args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    if forced is not None:
        max_new = [args.max_new_tokens or len(f) for f in forced]
    try:
        return generate(
            bundle.model, prompts, max_new, bundle.tokenizer.eos_id,
            temperature=args.temperature, tracer=tracer, request_ids=ids,
            sync_cuda=settings.sync_cuda, forced_tokens=forced,
        )  # fmt: skip
    except ValueError as exc:  # prompt longer than max_seq_len, too many prompts, ...
        raise CLIError(str(exc)) from None


def _prompt_tokens(args, bundle, texts: list[str] | None) -> list[list[int]]:
    """The prompts' token ids: text through the chat template, --input-ids as given."""
    if texts is not None:
        return [bundle.tokenizer.chat_prompt(t) for t in texts]
    return [ids for _, ids in args.prompt_ids]


def _check_forced(args, bundle, tokens: list[list[int]]) -> None:
    """Every batch's forced ids fit before any runs (a late error would waste the run)."""
    from kvtier.cli import CLIError

    eos, limit = bundle.tokenizer.eos_id, bundle.model.max_seq_len
    for (n, ids), prompt in zip(args.forced, tokens, strict=True):
        where = f"--forced-ids: {args.forced_ids} line {n}"
        if eos in ids[:-1]:
            raise CLIError(f"{where}: EOS (id {eos}) at token {ids.index(eos)} before the "
                           "last; generation stops at EOS")  # fmt: skip
        if len(prompt) + len(ids) > limit:
            raise CLIError(f"{where}: its prompt ({len(prompt)} tokens) and {len(ids)} forced "
                           f"ids exceed max_seq_len {limit}")  # fmt: skip


def _batch(args, bundle, tracer, settings, texts: list[str] | None,
           tokens: list[list[int]]) -> None:
    import json

    tok = bundle.tokenizer
    source = args.input_file if texts is not None else args.input_ids
    forced = [ids for _, ids in args.forced] if args.forced is not None else None
    show_ids = texts is None or forced is not None
    size = bundle.args.max_batch_size
    stem = Path(source).stem
    for start in range(0, len(tokens), size):
        chunk = tokens[start : start + size]
        names = [f"{stem}-{start + i}" for i in range(len(chunk))]
        outs = _generate(args, bundle, tracer, settings, chunk, names,
                         forced[start : start + size] if forced is not None else None)  # fmt: skip
        if bundle.rank == 0:
            for i, out in enumerate(outs):
                print("Prompt:", texts[start + i] if texts is not None else tok.decode(chunk[i]))
                print("Completion:", tok.decode(out))
                if show_ids:
                    print("Completion ids:", json.dumps(out))
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
