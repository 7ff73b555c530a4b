"""Find a policy class by name: built-ins, ``module:Class``, ``path/file.py:Class`` or an
entry point in the ``kvtier.policies`` group.

One registry for every policy kind. Eviction built-ins are listed here; placement, prefetch and
migration built-ins come from the ``POLICIES`` dict of ``kvtier.policies.<kind>`` (owned by
the tiered emulator), so each kind's module stays the single place that names its policies.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from importlib.metadata import entry_points
from pathlib import Path

from kvtier.policies.base import (
    EvictionPolicy,
    MigrationPolicy,
    PlacementPolicy,
    PrefetchPolicy,
)

ENTRY_POINT_GROUP = "kvtier.policies"

KINDS: dict[str, type] = {
    "eviction": EvictionPolicy,
    "placement": PlacementPolicy,
    "prefetch": PrefetchPolicy,
    "migration": MigrationPolicy,
}

#: built-in eviction policies: name -> "module:Class" (imported on demand)
EVICTION_BUILTINS: dict[str, str] = {
    "lru": "kvtier.policies.lru:LRUPolicy",
    "fifo": "kvtier.policies.fifo:FIFOPolicy",
    "lfu": "kvtier.policies.lfu:LFUPolicy",
    "s3fifo": "kvtier.policies.s3fifo:S3FIFOPolicy",
    "arc": "kvtier.policies.arc:ARCPolicy",
    "belady": "kvtier.policies.belady:BeladyPolicy",
    "opt": "kvtier.policies.belady:BeladyPolicy",
    "belady_bypass": "kvtier.policies.belady:BeladyBypassPolicy",
    "distance": "kvtier.policies.distance:DistancePolicy",
    "dsa_aware": "kvtier.policies.dsa_aware:DSAAwarePolicy",
}


class PolicyNotFound(LookupError):
    """Unknown policy name or unloadable ``module:Class``; one line naming the known ones."""


def _builtins(kind: str) -> dict[str, str | type]:
    if kind == "eviction":
        return dict(EVICTION_BUILTINS)
    try:
        mod = importlib.import_module(f"kvtier.policies.{kind}")
    except ModuleNotFoundError:
        return {}
    return dict(getattr(mod, "POLICIES", {}))


def _entry_points() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def known_policies(kind: str = "eviction") -> list[str]:
    """Names accepted by ``load_policy`` for ``kind`` (built-ins and entry points)."""
    _check_kind(kind)
    return sorted(set(_builtins(kind)) | set(_entry_points()))


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown policy kind {kind!r}; known: {', '.join(KINDS)}")


def _import_target(spec: str) -> object:
    mod_name, _, attr = spec.partition(":")
    if not attr:
        raise PolicyNotFound(f"policy {spec!r}: expected 'module:Class'")
    if mod_name.endswith(".py"):
        path = Path(mod_name)
        if not path.is_file():
            raise PolicyNotFound(f"policy {spec!r}: no such file {path}")
        name = f"kvtier_user_policy_{path.stem}"
        module = sys.modules.get(name)
        if module is None or getattr(module, "__file__", None) != str(path.resolve()):
            loader_spec = importlib.util.spec_from_file_location(name, path.resolve())
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = module
            loader_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(mod_name)
        except ModuleNotFoundError as exc:
            raise PolicyNotFound(f"policy {spec!r}: cannot import module {mod_name!r} ({exc})"
                                 ) from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise PolicyNotFound(f"policy {spec!r}: module {mod_name!r} has no {attr!r}") from None


def load_policy(spec: str, kind: str = "eviction") -> type:
    """The policy class named by ``spec`` (``"lru"``, ``"mypkg.mymod:MyPolicy"``,
    ``"my_policy.py:MyPolicy"`` or an entry-point name). Instantiate it yourself, e.g.
    ``load_policy("lru")(capacity)`` once per tier."""
    _check_kind(kind)
    spec = spec.strip()
    builtins = _builtins(kind)
    if spec in builtins:
        target = builtins[spec]
        cls = _import_target(target) if isinstance(target, str) else target
    elif ":" in spec:
        cls = _import_target(spec)
    else:
        eps = _entry_points()
        if spec not in eps:
            raise PolicyNotFound(
                f"unknown {kind} policy {spec!r}; known: {', '.join(known_policies(kind))} "
                f"(or 'module:Class', 'file.py:Class')")
        cls = eps[spec].load()
    base = KINDS[kind]
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise PolicyNotFound(f"policy {spec!r} is {cls!r}, not a subclass of {base.__name__}")
    return cls


def make_policy(spec: str, capacity: int, **kwargs) -> EvictionPolicy:
    """Load an eviction policy and build one instance with ``capacity`` blocks."""
    return load_policy(spec, "eviction")(capacity, **kwargs)
