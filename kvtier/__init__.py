"""kvtier: DeepSeek Sparse Attention top-k traces and tiered KV-cache emulation."""

__version__ = "0.1.0"
