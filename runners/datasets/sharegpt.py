"""ShareGPT (``anon8231489123/ShareGPT_Vicuna_unfiltered``,
``ShareGPT_V3_unfiltered_cleaned_split.json``): multi-turn chats as chat-message requests.

Roles are normalised (human/user -> user; gpt/chatgpt/bing/bard/assistant/model ->
assistant); system turns (site banners in the scrape) are dropped. Leading assistant turns are
dropped too: every split chunk after the first (``id`` suffix ``_N``, N > 0) starts with a
``gpt`` turn that repeats the previous chunk's last turn, and a chat template needs a user
turn first. Conversations with an unknown role, an empty/placeholder turn, or no user turn
are skipped and counted. A lone user turn is a valid prompt: files that keep only the first
human turn of each conversation (the filtered subsets serving benchmarks ship) load as one
request per entry, with no recorded answer (``meta["reference"]`` is ``None``); generation
is capped by the runner's ``--max-new-tokens``.

``turn_mode``:
- ``full``: one request per conversation: every turn up to the last user turn (the model
  answers that one; the recorded answer goes to ``meta["reference"]``).
- ``per_user_turn``: one request per user turn carrying the conversation so far; the requests
  of one conversation are consecutive, in turn order, and share ``group_id``, so each one's
  prompt is a prefix-extension of the previous one (what point D measures).
"""

from __future__ import annotations

import os

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

DATASET_ID = "anon8231489123/ShareGPT_Vicuna_unfiltered"
FILE_NAMES = ("ShareGPT_V3_unfiltered_cleaned_split.json", "*.json", "*.jsonl")
HINT = "run scripts/datasets/download_sharegpt.sh or pass --sharegpt-json FILE"
TURN_MODES = ("full", "per_user_turn")

USER = "user"
ASSISTANT = "assistant"
SYSTEM = "system"
ROLES = {
    "human": USER, "user": USER,
    "gpt": ASSISTANT, "chatgpt": ASSISTANT, "assistant": ASSISTANT, "bing": ASSISTANT,
    "bard": ASSISTANT, "model": ASSISTANT,
    "system": SYSTEM,
}
#: values that mean "no content" in the scrape
PLACEHOLDERS = frozenset({"", "\u200b", "EmptyMarkdownContent"})

SKIP_EMPTY_CONVERSATION = "empty_conversation"
SKIP_EMPTY_TURN = "empty_turn"
SKIP_UNKNOWN_ROLE = "unknown_role"
SKIP_NO_USER_TURN = "no_user_turn"


def load_sharegpt(
    path: str | os.PathLike | None = None,
    limit: int | None = None,
    *,
    turn_mode: str = "full",
    progress: bool = False,
) -> Workload:
    """Read a ShareGPT JSON array (or JSON Lines) of ``{"id", "conversations"}`` entries.

    ``limit`` counts requests (in ``per_user_turn`` mode the last conversation may be cut
    after any of its turns, keeping the earlier ones).
    """
    limit = check_limit(limit)
    if turn_mode not in TURN_MODES:
        raise ValueError(f"turn_mode must be one of {'|'.join(TURN_MODES)}, got {turn_mode!r}")
    file = resolve_file(path, FILE_NAMES, "ShareGPT JSON", HINT)
    wl = Workload(
        name="sharegpt",
        requests=[],
        source={"dataset_id": DATASET_ID, "file": str(file), "split": None, "revision": file_revision(file),
                "sha256": sha256_file(file), "turn_mode": turn_mode},
    )
    seen: dict[str, int] = {}
    rows = tqdm(iter_json_records(file), desc="sharegpt", unit="conv", disable=not progress)
    for index, row in rows:
        if limit is not None and len(wl.requests) >= limit:
            break
        conv = row if isinstance(row, Bad) else normalise(row)
        if isinstance(conv, Bad):
            wl.skip(conv.reason)
            continue
        messages, dropped = conv
        cid = row.get("id")
        cid = cid if isinstance(cid, str) and cid else f"conv{index}"
        n = seen.get(cid, 0)  # ids are unique upstream; keep ours unique anyway
        seen[cid] = n + 1
        if n:
            cid = f"{cid}#{n}"
        meta_base = {"conversation_id": row.get("id"), "index": index, **dropped}
        for req in _requests(cid, messages, turn_mode, meta_base):
            if limit is not None and len(wl.requests) >= limit:
                break
            wl.requests.append(req)
    return wl


def normalise(row: object) -> tuple[list[dict[str, str]], dict[str, int]] | Bad:
    """Entry -> (messages with normalised roles, counts of dropped turns) or why it is bad."""
    if not isinstance(row, dict):
        return Bad(NOT_AN_OBJECT)
    turns = row.get("conversations")
    if turns is None:
        return Bad(MISSING_FIELD)
    if not isinstance(turns, list):
        return Bad(WRONG_TYPE)
    if not turns:
        return Bad(SKIP_EMPTY_CONVERSATION)
    messages: list[dict[str, str]] = []
    dropped = {"dropped_system_turns": 0, "dropped_leading_assistant_turns": 0}
    for turn in turns:
        if not isinstance(turn, dict):
            return Bad(WRONG_TYPE)
        who, value = turn.get("from"), turn.get("value")
        if who is None or value is None:
            return Bad(MISSING_FIELD)
        if not isinstance(who, str) or not isinstance(value, str):
            return Bad(WRONG_TYPE)
        role = ROLES.get(who.strip().lower())
        if role is None:
            return Bad(SKIP_UNKNOWN_ROLE)
        if value.strip() in PLACEHOLDERS:
            return Bad(SKIP_EMPTY_TURN)
        if role == SYSTEM:
            dropped["dropped_system_turns"] += 1
            continue
        if role == ASSISTANT and not messages:
            dropped["dropped_leading_assistant_turns"] += 1
            continue
        messages.append({"role": role, "content": value})
    if not messages:
        return Bad(SKIP_NO_USER_TURN)
    return messages, dropped


def _requests(cid: str, messages: list[dict[str, str]], turn_mode: str, meta_base: dict
              ) -> list[Request]:
    user_idx = [i for i, m in enumerate(messages) if m["role"] == USER]
    n_user = len(user_idx)
    if turn_mode == "full":
        user_idx = user_idx[-1:]
    out = []
    for k, i in enumerate(user_idx):
        nxt = messages[i + 1] if i + 1 < len(messages) else None
        reference = nxt["content"] if nxt is not None and nxt["role"] == ASSISTANT else None
        meta = {**meta_base, "turn": k, "user_turns": n_user, "reference": reference}
        rid = cid if turn_mode == "full" else f"{cid}/t{k}"
        out.append(Request(request_id=rid, messages=[dict(m) for m in messages[: i + 1]],
                           group_id=cid, meta=meta))
    return out
