"""Shared pieces of the loaders: locating files, hashing, and row readers that never raise.

The readers yield ``(line_or_index, value)`` where ``value`` is either the parsed row or a
``Bad`` carrying the skip reason, so each loader counts bad rows the same way. JSON arrays are
read element by element (a 670 MB ShareGPT file with ``limit=64`` stops after 64 entries),
and bad UTF-8 inside one element only costs that element.
"""

from __future__ import annotations

import codecs
import gc
import hashlib
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvtier.runners.datasets import DatasetNotFound

#: reasons shared by all loaders (loaders add their own)
BAD_UTF8 = "bad_utf8"
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
#: a CSV row with more cells than the header: which cell is extra is unknowable, so none is read
EXTRA_CELLS = "extra_cells"

_CHUNK = 1 << 20
_WS = re.compile(r"[ \t\r\n]*")
_DELIMS = frozenset(",] \t\r\n")
#: an escaped UTF-16 surrogate: the one way valid JSON text parses to a string that does not
#: encode to UTF-8 (a lone half); checked exactly only on a hit
_ESC_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


@dataclass(frozen=True, slots=True)
class Bad:
    """A row that could not be read, and why (the key counted in ``Workload.skipped``)."""

    reason: str


@contextmanager
def gc_paused() -> Iterator[None]:
    """Build millions of small objects without the cyclic GC rescanning them (2-3x faster);
    they hold no cycles, and the previous GC state is restored."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def check_limit(limit: int | None) -> int | None:
    """``None`` = no limit; a negative limit is a config error naming the field."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
    return limit


def repo_root() -> Path | None:
    """The kvtier checkout this package runs from (editable install), else ``None``."""
    for parent in Path(__file__).resolve().parents:
        pyproject = parent / "pyproject.toml"
        if pyproject.is_file() and 'name = "kvtier"' in pyproject.read_text(errors="replace"):
            return parent
    return None


def data_root() -> Path:
    """Where downloads and extractions go: ``$DATAS_DIR``, else ``<repo>/data/huggingface``
    (``./data/huggingface`` when not running from a checkout)."""
    env = os.environ.get("DATAS_DIR")
    if env:
        return Path(env).expanduser()
    root = repo_root()
    return (root if root is not None else Path.cwd()) / "data" / "huggingface"


def resolve_file(
    path: str | os.PathLike | None, names: tuple[str, ...], what: str, hint: str
) -> Path:
    """A file given directly, or one found in a directory (``path=None``: ``data_root()``).

    Exact ``names`` are searched first, directly and then recursively (the download scripts
    nest files in ``<owner>__<name>/``). A glob such as ``*.csv`` only looks at the
    directory's own files, never below it, and must match exactly one, so a shared data
    directory cannot hand one dataset's file to another dataset's loader. Raises
    ``DatasetNotFound`` with ``hint`` (the download script / flag) otherwise.
    """
    base = Path(path).expanduser() if path is not None else data_root()
    if base.is_file():
        return base
    if not base.is_dir():
        raise DatasetNotFound(f"{what}: {base} does not exist; {hint}")
    exact = [n for n in names if "*" not in n]
    for name in exact:
        if (base / name).is_file():
            return base / name
    for name in exact:
        found = sorted(p for p in base.rglob(name) if p.is_file())
        if found:
            return found[0]
    for pattern in (n for n in names if "*" in n):
        found = sorted(p for p in base.glob(pattern) if p.is_file())
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            shown = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
            raise DatasetNotFound(f"{what}: several files match {pattern} in {base} "
                                  f"({shown}); pass the file itself")
    raise DatasetNotFound(f"{what}: none of {', '.join(names)} in {base}; {hint}")


def row_shape(row: list[str], n_columns: int) -> Bad | None:
    """A CSV row whose cell count differs from the header's cannot be read by position
    without taking some cell from the wrong column: fewer cells is ``missing_field``, more
    is ``extra_cells``; ``None`` when the row has exactly ``n_columns`` cells."""
    if len(row) < n_columns:
        return Bad(MISSING_FIELD)
    if len(row) > n_columns:
        return Bad(EXTRA_CELLS)
    return None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


#: sidecar a download helper writes next to a file it exported (``{"revision": ...}``)
SOURCE_SIDECAR = ".kvtier-source.json"
_HEX40 = re.compile(r"[0-9a-f]{40}")


def file_revision(path: Path, max_up: int = 4) -> str | None:
    """The hub commit a local file came from, if a download left a record of it.

    Reads the sidecar ``<file>.kvtier-source.json`` (written by ``hub.py`` for exports), or
    the ``.cache/huggingface/download/<file>.metadata`` that ``hf_hub_download(local_dir=)``
    writes (first line: the commit hash). ``None`` for files from anywhere else.
    """
    path = Path(path)
    sidecar = path.with_name(path.name + SOURCE_SIDECAR)
    try:
        if sidecar.is_file():
            rev = json.loads(sidecar.read_text(encoding="utf-8")).get("revision")
            return rev if isinstance(rev, str) and rev else None
        for parent in list(path.parents)[:max_up]:
            meta = (parent / ".cache" / "huggingface" / "download"
                    / (path.relative_to(parent).as_posix() + ".metadata"))
            if meta.is_file():
                with open(meta, encoding="utf-8") as f:
                    first = f.readline().strip()
                return first if _HEX40.fullmatch(first) else None
    except (OSError, ValueError, AttributeError):
        return None
    return None


def has_bad_utf8(obj: Any) -> bool:
    """True if a value decoded with ``surrogateescape`` carries undecodable bytes."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(obj, dict):
        return any(has_bad_utf8(k) or has_bad_utf8(v) for k, v in obj.items())
    if isinstance(obj, list):
        return any(has_bad_utf8(v) for v in obj)
    return False


def iter_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Binary lines without their ``\\n``/``\\r\\n``; line numbers start at 1."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            yield lineno, raw.rstrip(b"\r\n")


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """JSON Lines: ``(line number, object or Bad)``; blank lines are ignored."""
    for lineno, raw in iter_lines(path):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield lineno, Bad(BAD_UTF8)
            continue
        if lineno == 1:
            text = text.lstrip("\ufeff")
        try:
            obj = json.loads(text)
        except ValueError:
            yield lineno, Bad(INVALID_JSON)
            continue
        yield lineno, (Bad(BAD_UTF8) if _ESC_SURROGATE.search(text) and has_bad_utf8(obj)
                       else obj)


def _first_char(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(4096).decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    return head[:1]


def iter_json_array(path: Path) -> Iterator[tuple[int, Any]]:
    """Elements of a top-level JSON array, one at a time: ``(index, object or Bad)``.

    Text is decoded with ``surrogateescape`` so an element holding bad UTF-8 is reported as
    ``Bad("bad_utf8")`` and the elements after it still load. A syntax error cannot be
    resynchronised: it ends the read with one ``Bad("invalid_json")``.
    """
    decoder = json.JSONDecoder()
    udec = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
    with open(path, "rb") as f:
        buf = ""
        pos = 0
        eof = False

        def more() -> bool:
            nonlocal buf, pos, eof
            if eof:
                return False
            chunk = f.read(max(_CHUNK, len(buf) - pos))
            eof = not chunk
            buf = buf[pos:] + udec.decode(chunk, final=eof)
            pos = 0
            return True

        def skip_ws() -> bool:
            """Advance past whitespace; False at end of input."""
            nonlocal pos
            while True:
                pos = _WS.match(buf, pos).end()
                if pos < len(buf):
                    return True
                if not more():
                    return False

        more()
        if buf.startswith("\ufeff"):
            pos = 1
        if not skip_ws() or buf[pos] != "[":
            yield 0, Bad(INVALID_JSON)
            return
        pos += 1
        index = 0
        while True:
            if not skip_ws():
                yield index, Bad(INVALID_JSON)  # truncated: no closing bracket
                return
            if buf[pos] == "]":
                return
            if index > 0:
                if buf[pos] != ",":
                    yield index, Bad(INVALID_JSON)
                    return
                pos += 1
                if not skip_ws():
                    yield index, Bad(INVALID_JSON)
                    return
            while True:
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                except ValueError:
                    if more():
                        continue
                    yield index, Bad(INVALID_JSON)
                    return
                if (isinstance(obj, int | float) and not isinstance(obj, bool)
                        and (end == len(buf) or buf[end] not in _DELIMS) and more()):
                    continue  # a number ("0." / "1e") may go on in the next chunk
                break
            bad = _bad_element(buf[pos:end], obj)
            pos = end
            yield index, (Bad(BAD_UTF8) if bad else obj)
            index += 1


def _bad_element(text: str, obj: Any) -> bool:
    """Raw undecodable bytes (surrogateescape'd) or an escaped lone surrogate in one element."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return True
    return _ESC_SURROGATE.search(text) is not None and has_bad_utf8(obj)


def iter_json_records(path: Path) -> Iterator[tuple[int, Any]]:
    """A JSON array file or a JSON Lines file, whichever ``path`` holds."""
    if _first_char(path) == "[":
        return iter_json_array(path)
    return iter_jsonl(path)


def parse_count(value: Any) -> int | Bad:
    """A token count: a non-negative integer (``"12"``, ``12``, ``"12.0"``); else ``Bad``."""
    if value is None or value == "":
        return Bad(MISSING_FIELD)
    if isinstance(value, bool):
        return Bad(WRONG_TYPE)
    if isinstance(value, int):
        n = value
    elif isinstance(value, float | str):
        try:
            x = float(value)
        except ValueError:
            return Bad("non_numeric")
        if x != x or x in (float("inf"), float("-inf")) or x != int(x):
            return Bad("non_numeric")
        n = int(x)
    else:
        return Bad(WRONG_TYPE)
    if n < 0:
        return Bad("negative_tokens")
    return n


def parse_seconds(value: Any) -> float | Bad:
    """A finite, non-negative time in seconds from a number or a numeric string."""
    if value is None or value == "":
        return Bad(MISSING_FIELD)
    if isinstance(value, bool):
        return Bad("bad_timestamp")
    try:
        x = float(value)
    except (TypeError, ValueError):
        return Bad("bad_timestamp")
    if x != x or x in (float("inf"), float("-inf")) or x < 0:
        return Bad("bad_timestamp")
    return x
