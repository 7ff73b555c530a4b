"""Trace settings shared by every command that records a trace (generate, run, demo, sanity).

``add_trace_args`` adds the flags; ``TraceSettings.from_args`` validates them and fails at start
naming the flag. Everything in here lands in ``summary.json["config"]``.
"""

from __future__ import annotations

import argparse

import msgspec


class TraceSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Every setting that shapes the records of a trace."""

    kv_block_size: int = 16
    sample_rate: float = 1.0
    sample_seed: int = 0
    store_scores: bool = False
    prefix_key_tokens: int = 256
    sync_cuda: bool = True
    kv_bytes_per_token: int | None = None  # None: derived from the model config
    shard_records: int = 0  # 0: one trace_steps.jsonl; else records per shard file

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ValueError naming the flag of the first invalid setting."""
        if self.kv_block_size <= 0:
            raise ValueError(f"--kv-block-size must be > 0, got {self.kv_block_size}")
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"--trace-sample-rate must be in (0, 1], got {self.sample_rate}")
        if self.prefix_key_tokens < 0:
            raise ValueError(f"--trace-prefix-key-tokens must be >= 0, got {self.prefix_key_tokens}")
        if self.kv_bytes_per_token is not None and self.kv_bytes_per_token <= 0:
            raise ValueError(f"--kv-bytes-per-token must be > 0, got {self.kv_bytes_per_token}")
        if self.shard_records < 0:
            raise ValueError(f"--trace-shard-records must be >= 0, got {self.shard_records}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TraceSettings:
        return cls(
            kv_block_size=args.kv_block_size,
            sample_rate=args.trace_sample_rate,
            sample_seed=args.trace_sample_seed,
            store_scores=args.trace_store_scores,
            prefix_key_tokens=args.trace_prefix_key_tokens,
            sync_cuda=not args.trace_no_sync_cuda,
            kv_bytes_per_token=args.kv_bytes_per_token,
            shard_records=args.trace_shard_records,
        )

    def to_dict(self) -> dict:
        return msgspec.structs.asdict(self)


def add_trace_args(parser: argparse.ArgumentParser) -> None:
    """Add the shared trace flags to a subcommand's parser."""
    g = parser.add_argument_group("trace")
    g.add_argument("--kv-block-size", type=int, default=16, metavar="N",
                   help="tokens per KV block for block ids and fetch accounting (default 16)")
    g.add_argument("--trace-sample-rate", type=float, default=1.0, metavar="R",
                   help="fraction of (request, decode step) pairs recorded, chosen by a hash of "
                        "(seed, request id, step) so batching does not change it (default 1.0)")
    g.add_argument("--trace-sample-seed", type=int, default=0, metavar="S",
                   help="seed of the sampling hash (default 0)")
    g.add_argument("--trace-store-scores", action="store_true",
                   help="also store the indexer scores of the selected tokens (scores_topk)")
    g.add_argument("--trace-prefix-key-tokens", type=int, default=256, metavar="N",
                   help="prompt tokens whose full blocks form the shareable prefix (default 256)")
    g.add_argument("--trace-no-sync-cuda", action="store_true",
                   help="do not synchronise CUDA after each decode step (latency_us then "
                        "measures launch time only)")
    g.add_argument("--kv-bytes-per-token", type=int, default=None, metavar="B",
                   help="KV bytes per token per layer for fetch accounting (default: derived "
                        "from the model config: MLA latent + rope key + indexer key + scale)")
    g.add_argument("--trace-shard-records", type=int, default=0, metavar="N",
                   help="split the trace into trace_steps.NNNNN.jsonl files of about N records "
                        "(default 0: one file)")
