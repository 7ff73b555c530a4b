"""RULER (``allenai/ruler_data`` tarballs, or rows made by ``NVIDIA/RULER``'s generator).

The tarball (``data_debug.tgz`` by default, or ``data_100_samples.tgz``) is extracted once
under ``<data dir>/ruler/<tarball name>/`` with path-traversal-safe extraction (absolute
names, ``..``, links and device files are refused and counted). Every ``*.jsonl``/``*.json``
under the extracted tree is read line by line into one schema:

- prompt = ``input`` + ``answer_prefix`` (RULER's own predictor sends both; ``input``
  excludes the prefix). HELMET-style rows without ``input`` use
  ``context + "\\n\\n" + query`` (or ``question``) instead.
- task = the file name without its length suffix (``niah_single_1_4096.jsonl``) or, for the
  generic ``validation[_<L>].jsonl``, the parent directory's name;
- length = the numeric suffix of the file name, else the nearest all-digit directory
  (``synthetic/<L>/data/<task>/validation.jsonl``); the row's ``length`` field counts another
  tokenizer's tokens and only goes to ``meta``. ``index`` is not a row id (it repeats, and
  ``niah.py`` overwrites it with a character offset), so ids come from the path and line.

Rows are taken round-robin over the files (sorted by task, then length), so a small
``limit`` covers every task instead of the first file only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from kvtier.runners.datasets import DatasetNotFound
from kvtier.runners.datasets.common import (
    MISSING_FIELD,
    NOT_AN_OBJECT,
    WRONG_TYPE,
    Bad,
    check_limit,
    data_root,
    file_revision,
    iter_json_records,
    sha256_file,
)
from kvtier.runners.requests import Request, Workload

DATASET_ID = "allenai/ruler_data"
DEFAULT_TGZ = "data_debug.tgz"
HINT = "run scripts/datasets/download_ruler.sh or pass --ruler-tgz FILE (or a directory)"
_MARKER = ".kvtier_extracted"
_GENERIC_STEMS = frozenset({"", "validation", "test", "train", "data", "dev"})
#: a context-length suffix has 3+ digits, so task numbers (``niah_single_1``) are not one
_LEN_SUFFIX = re.compile(r"(?:^|[_\-.])(\d{3,})$")

SKIP_UNSAFE_MEMBER = "unsafe_tar_member"
SKIP_EMPTY_INPUT = "empty_input"
SKIP_NOT_ROWS = "not_a_row_file"
_WHOLE_JSON_MAX = 64 << 20


def load_ruler(
    path: str | os.PathLike | None = None,
    limit: int | None = None,
    *,
    tgz_name: str = DEFAULT_TGZ,
    data_dir: str | os.PathLike | None = None,
    tasks: Sequence[str] | None = None,
    lengths: Sequence[int] | None = None,
    split: str | None = None,
    progress: bool = False,
) -> Workload:
    """Load RULER rows from a tarball, a directory holding one, or an extracted tree.

    ``path=None`` looks for ``tgz_name`` (or an earlier extraction) under the data dir.
    ``data_dir`` is where tarballs are extracted (default: ``$DATAS_DIR`` or
    ``<repo>/data/huggingface``). ``tasks``/``lengths`` keep only those; ``split`` prefers
    files whose name contains it (as the reference fork does).
    """
    limit = check_limit(limit)
    wl = Workload(name="ruler", requests=[],
                  source={"dataset_id": DATASET_ID, "file": None, "split": split,
                          "revision": None, "sha256": None})
    root = _locate(path, tgz_name, Path(data_dir) if data_dir is not None else None, wl)
    files = _data_files(root, split)
    if tasks is not None:
        files = [f for f in files if f[1] in set(tasks)]
    if lengths is not None:
        files = [f for f in files if f[2] in {int(n) for n in lengths}]
    if not files:
        raise DatasetNotFound(f"RULER: no *.jsonl/*.json task files under {root}; {HINT}")
    wl.source["root"] = str(root)
    wl.source["files"] = len(files)
    seen: dict[str, int] = {}
    bar = tqdm(desc="ruler", unit="row", disable=not progress)
    for file, task, length, lineno, row in _round_robin(files):
        if limit is not None and len(wl.requests) >= limit:
            break
        bar.update()
        req = row if isinstance(row, Bad) else _to_request(row, task, length, file, lineno)
        if isinstance(req, Bad):
            wl.skip(req.reason)
            continue
        n = seen.get(req.request_id, 0)
        seen[req.request_id] = n + 1
        if n:
            req.request_id = f"{req.request_id}#{n}"
        wl.requests.append(req)
    bar.close()
    return wl


def _locate(path: str | os.PathLike | None, tgz_name: str, data_dir: Path | None,
            wl: Workload) -> Path:
    """The directory to read: an extracted tarball or a directory of task files."""
    base = Path(path).expanduser() if path is not None else data_root()
    extract_base = (data_dir or data_root()) / "ruler"
    if base.is_file():
        return _extract(base, extract_base, wl)
    if not base.is_dir():
        raise DatasetNotFound(f"RULER: {base} does not exist; {HINT}")
    tgz = base / tgz_name
    if not tgz.is_file():
        found = sorted(p for p in base.rglob(tgz_name) if p.is_file())
        tgz = found[0] if found else tgz
    if tgz.is_file():
        return _extract(tgz, extract_base, wl)
    stem = _tar_stem(tgz_name)
    if path is None and (extract_base / stem / _MARKER).is_file():
        return extract_base / stem
    if path is not None:
        return base  # a directory of already-extracted task files
    raise DatasetNotFound(f"RULER: {tgz_name} not found under {base}; {HINT}")


def _tar_stem(name: str) -> str:
    for ext in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _safe_members(tar: tarfile.TarFile) -> tuple[list[tarfile.TarInfo], int]:
    """Regular files and directories whose names stay inside the destination."""
    safe, unsafe = [], 0
    for m in tar.getmembers():
        p = PurePosixPath(m.name)
        if (p.is_absolute() or ".." in p.parts or m.name.startswith(("/", "\\"))
                or "\\" in m.name or not (m.isfile() or m.isdir())):
            unsafe += 1
            continue
        safe.append(m)
    return safe, unsafe


def _extract(tgz: Path, extract_base: Path, wl: Workload) -> Path:
    """Extract ``tgz`` once (a marker holds its sha256) and return the extraction dir."""
    digest = sha256_file(tgz)
    wl.source.update(file=str(tgz), sha256=digest, revision=file_revision(tgz))
    dest = extract_base / _tar_stem(tgz.name)
    marker = dest / _MARKER
    if marker.is_file() and marker.read_text().split()[:1] == [digest]:
        unsafe = int((marker.read_text().split() + ["0", "0"])[1])
        if unsafe:
            wl.skip(SKIP_UNSAFE_MEMBER, unsafe)
        return dest
    tmp = extract_base / f".{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with tarfile.open(tgz) as tar:
            members, unsafe = _safe_members(tar)
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, members=members, filter="data")
            else:  # Python without extraction filters: members were vetted above
                tar.extractall(tmp, members=members)  # noqa: S202
    except (tarfile.TarError, OSError, EOFError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DatasetNotFound(f"RULER: cannot extract {tgz}: {exc}; {HINT}") from exc
    if unsafe:
        wl.skip(SKIP_UNSAFE_MEMBER, unsafe)
    (tmp / _MARKER).write_text(f"{digest} {unsafe}\n")
    shutil.rmtree(dest, ignore_errors=True)
    try:
        tmp.rename(dest)
    except OSError:  # another process extracted the same tarball first: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not (marker.is_file() and marker.read_text().split()[:1] == [digest]):
            raise
    return dest


def task_and_length(rel: Path) -> tuple[str, int | None]:
    """Task and context length from a task file's path (relative to the data root)."""
    stem = rel.stem
    m = _LEN_SUFFIX.search(stem)
    length = int(m.group(1)) if m else None
    base = stem[: m.start()] if m else stem
    if length is None:
        for part in reversed(rel.parts[:-1]):
            if part.isdigit() and len(part) >= 3:
                length = int(part)
                break
    if base.lower() in _GENERIC_STEMS:
        task = rel.parent.name if rel.parent.name else base
    else:
        task = base
    return task, length


def _data_files(root: Path, split: str | None) -> list[tuple[Path, str, int | None]]:
    files = [p for p in root.rglob("*") if p.suffix in (".jsonl", ".json") and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    if split:
        preferred = [p for p in files if split in p.name]
        files = preferred or files
    out = [(p, *task_and_length(p.relative_to(root))) for p in files]
    out.sort(key=lambda f: (f[1], f[2] if f[2] is not None else -1, str(f[0])))
    return out


def _iter_rows(path: Path) -> Iterator[tuple[int, object]]:
    """Rows of one task file. A ``.json`` holding one pretty-printed object (a config or
    metadata file shipped next to the data) is one row if it looks like one, else it is
    skipped as a whole (``Bad("not_a_row_file")``) instead of as many invalid lines."""
    if path.suffix == ".json" and path.stat().st_size < _WHOLE_JSON_MAX:
        raw = path.read_bytes()
        if raw.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"{":
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                obj = None  # several objects (JSON Lines) or broken: read line by line
            if isinstance(obj, dict):
                yield 1, obj if ("input" in obj or "context" in obj) else Bad(SKIP_NOT_ROWS)
                return
    yield from iter_json_records(path)


def _round_robin(files: list[tuple[Path, str, int | None]]
                 ) -> Iterator[tuple[Path, str, int | None, int, object]]:
    """One row from each file in turn until all are exhausted."""
    iters = [(f, t, n, _iter_rows(f)) for f, t, n in files]
    while iters:
        alive = []
        for f, t, n, it in iters:
            item = next(it, None)
            if item is None:
                continue
            alive.append((f, t, n, it))
            yield f, t, n, item[0], item[1]
        iters = alive


def _to_request(row: object, task: str, length: int | None, file: Path, lineno: int
                ) -> Request | Bad:
    if not isinstance(row, dict):
        return Bad(NOT_AN_OBJECT)
    text = row.get("input")
    if text is None:
        ctx = row.get("context")
        query = row.get("query", row.get("question"))
        if ctx is None or query is None:
            return Bad(MISSING_FIELD)
        if not isinstance(ctx, str) or not isinstance(query, str):
            return Bad(WRONG_TYPE)
        text = f"{ctx}\n\n{query}"
    elif not isinstance(text, str):
        return Bad(WRONG_TYPE)
    prefix = row.get("answer_prefix")
    if prefix is not None and not isinstance(prefix, str):
        return Bad(WRONG_TYPE)
    outputs = row.get("outputs")
    if outputs is not None and not (
        isinstance(outputs, list) and all(isinstance(o, str) for o in outputs)
    ):
        return Bad(WRONG_TYPE)
    if not text.strip():
        return Bad(SKIP_EMPTY_INPUT)
    meta = {
        "task": task,
        "length": length,
        "outputs": outputs,
        "answer_prefix": prefix,
        "row_length": row.get("length"),
        "index": row.get("index"),
        "file": file.name,
        "line": lineno,
    }
    len_tag = length if length is not None else "na"
    return Request(request_id=f"ruler-{task}-{len_tag}-{lineno}",
                   prompt=text + (prefix or ""), meta=meta)
