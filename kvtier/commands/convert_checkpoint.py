"""``kvtier convert-checkpoint``: HF DeepSeek-V3.2 checkpoint -> per-rank kvtier shards."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert-checkpoint",
        help="convert a Hugging Face DeepSeek-V3.2 checkpoint to model{rank}-mp{N}.safetensors",
        description="Convert a Hugging Face DeepSeek-V3.2(-Exp) checkpoint directory (sharded "
        "safetensors + model.safetensors.index.json) into one safetensors shard per "
        "tensor-parallel rank, with kvtier's parameter names (docs/CHECKPOINTS.md). The MTP "
        "layer is skipped and the tokenizer files are copied. The checkpoint is validated "
        "before anything is written.",
    )
    p.add_argument("--hf-ckpt-path", required=True, metavar="DIR",
                   help="the Hugging Face checkpoint directory")
    p.add_argument("--save-path", required=True, metavar="DIR",
                   help="output directory (created if missing)")
    p.add_argument("--n-experts", type=int, required=True, metavar="E",
                   help="number of routed experts (256 for DeepSeek-V3.2); must match config.json")
    p.add_argument("--model-parallel", type=int, required=True, metavar="N",
                   help="tensor-parallel size: writes N shards, one per rank (torchrun "
                        "--nproc-per-node N)")
    p.add_argument("--dry-run", action="store_true",
                   help="validate the checkpoint and print the plan, write nothing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvtier.cli import CLIError
    from kvtier.model.convert import ConversionError, convert, plan_conversion

    try:
        if args.dry_run:
            plan = plan_conversion(args.hf_ckpt_path, args.n_experts, args.model_parallel)
            for rank in range(plan.mp):
                n = sum(1 for _ in plan.rank_tensors(rank))
                print(f"rank {rank}: {n} tensors")
            print(f"skipped (MTP): {len(plan.skipped)} tensors")
            return 0
        written = convert(args.hf_ckpt_path, args.save_path, args.n_experts, args.model_parallel)
    except ConversionError as exc:
        raise CLIError(str(exc)) from None
    for path in written:
        print(path)
    return 0
