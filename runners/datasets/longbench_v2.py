"""LongBench v2 (``zai-org/LongBench-v2``, file ``data.json``, split ``train``, 503 items).

The prompt is the official zero-shot template of ``THUDM/LongBench`` ``pred.py``, filled the
same way (``str.replace`` of ``$DOC$``, ``$Q$``, ``$C_A$``..``$C_D$`` with ``.strip()``ped
fields). ``length`` in the data is a category (short|medium|long), not a token count.
Over-long prompts are truncated by the runner on token ids with ``middle_truncate``, as
``pred.py`` does, because only the runner has the tokenizer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TypeVar

from tqdm import tqdm

from kvtier.runners.datasets.common import (
    MISSING_FIELD,
    NOT_AN_OBJECT,
    WRONG_TYPE,
    Bad,
    check_limit,
    file_revision,
    iter_json_records,
    resolve_file,
    sha256_file,
)
from kvtier.runners.requests import Request, Workload

DATASET_ID = "zai-org/LongBench-v2"
FILE_NAMES = ("zai-org__LongBench-v2/data.json", "data.json", "*.jsonl")
HINT = "run scripts/datasets/download_longbench_v2.sh or pass --lbv2-json FILE"
LENGTHS = ("short", "medium", "long")
FIELDS = ("_id", "domain", "sub_domain", "difficulty", "length", "question",
          "choice_A", "choice_B", "choice_C", "choice_D", "answer", "context")
#: fields the prompt needs; the rest only go to ``meta``
PROMPT_FIELDS = ("question", "choice_A", "choice_B", "choice_C", "choice_D", "context")

# Official THUDM/LongBench prompts/*.txt (MIT), byte for byte; none ends with a newline.
TEMPLATES = {
    "0shot": (
        "Please read the following text and answer the question below.\n\n<text>\n$DOC$\n"
        "</text>\n\nWhat is the correct answer to this question: $Q$\nChoices:\n(A) $C_A$\n"
        "(B) $C_B$\n(C) $C_C$\n(D) $C_D$\n\n"
        'Format your response as follows: "The correct answer is (insert answer here)".'
    ),
    "0shot_no_context": (
        "What is the correct answer to this question: $Q$\nChoices:\n(A) $C_A$\n(B) $C_B$\n"
        "(C) $C_C$\n(D) $C_D$\n\n"
        "What is the single, most likely answer choice? Format your response as follows: "
        '"The correct answer is (insert answer here)".'
    ),
    "0shot_cot": (
        "Please read the following text and answer the questions below.\n\n<text>\n$DOC$\n"
        "</text>\n\nWhat is the correct answer to this question: $Q$\nChoices:\n(A) $C_A$\n"
        "(B) $C_B$\n(C) $C_C$\n(D) $C_D$\n\n"
        "Let\u2019s think step by step:"
    ),
}

SKIP_LENGTH_FILTER = "filtered_length"
SKIP_BAD_LENGTH = "bad_length_category"

T = TypeVar("T")


def fill_template(template: str, row: dict) -> str:
    """Fill an official template exactly as ``pred.py`` does."""
    return (
        template.replace("$DOC$", row["context"].strip())
        .replace("$Q$", row["question"].strip())
        .replace("$C_A$", row["choice_A"].strip())
        .replace("$C_B$", row["choice_B"].strip())
        .replace("$C_C$", row["choice_C"].strip())
        .replace("$C_D$", row["choice_D"].strip())
    )


def middle_truncate(ids: Sequence[T], max_len: int) -> list[T]:
    """``pred.py``'s truncation ``ids[:max_len//2] + ids[-max_len//2:]``: the first
    ``max_len // 2`` and the last ``ceil(max_len / 2)`` token ids (Python's ``-max_len//2``
    rounds down), i.e. exactly ``max_len`` ids. ``max_len=0`` gives ``[]``."""
    if max_len < 0:
        raise ValueError(f"max_len must be >= 0, got {max_len}")
    ids = list(ids)
    if len(ids) <= max_len:
        return ids
    if max_len == 0:
        return []
    return ids[: max_len // 2] + ids[-max_len // 2:]


def load_longbench_v2(
    path: str | os.PathLike | None = None,
    limit: int | None = None,
    *,
    length: str | None = None,
    template: str = "0shot",
    progress: bool = False,
) -> Workload:
    """Read LongBench v2 items (``data.json`` array or JSON Lines, a file or a directory).

    ``length`` keeps one category (short|medium|long); ``template`` is ``0shot`` (default,
    the official no-CoT prompt), ``0shot_no_context`` or ``0shot_cot``.
    """
    limit = check_limit(limit)
    if length is not None and length not in LENGTHS:
        raise ValueError(f"length must be one of {'|'.join(LENGTHS)}, got {length!r}")
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {'|'.join(TEMPLATES)}, got {template!r}")
    file = resolve_file(path, FILE_NAMES, "LongBench v2 data", HINT)
    wl = Workload(
        name="longbench-v2",
        requests=[],
        source={"dataset_id": DATASET_ID, "file": str(file), "split": "train",
                "revision": file_revision(file), "sha256": sha256_file(file), "template": template,
                "length_filter": length},
    )
    seen: dict[str, int] = {}
    rows = tqdm(iter_json_records(file), desc="longbench-v2", unit="item",
                disable=not progress)
    for index, row in rows:
        if limit is not None and len(wl.requests) >= limit:
            break
        req = row if isinstance(row, Bad) else _to_request(row, index, length, template)
        if isinstance(req, Bad):
            wl.skip(req.reason)
            continue
        n = seen.get(req.request_id, 0)  # ids are unique upstream; keep ours unique anyway
        seen[req.request_id] = n + 1
        if n:
            req.request_id = f"{req.request_id}#{n}"
        wl.requests.append(req)
    return wl


def _to_request(row: object, index: int, length: str | None, template: str) -> Request | Bad:
    if not isinstance(row, dict):
        return Bad(NOT_AN_OBJECT)
    for key in PROMPT_FIELDS:
        if key not in row or row[key] is None:
            return Bad(MISSING_FIELD)
        if not isinstance(row[key], str):
            return Bad(WRONG_TYPE)
    cat = row.get("length")
    if cat not in LENGTHS:
        return Bad(SKIP_BAD_LENGTH)
    if length is not None and cat != length:
        return Bad(SKIP_LENGTH_FILTER)
    rid = row.get("_id")
    rid = rid if isinstance(rid, str) and rid else f"item{index}"
    meta = {k: row.get(k) for k in FIELDS if k not in PROMPT_FIELDS and k != "_id"}
    meta["index"] = index
    return Request(request_id=f"lbv2-{rid}", prompt=fill_template(TEMPLATES[template], row),
                   meta=meta)
