"""Turn policy specs from the command line (``lru``, ``local_first:replicas=2``,
``mypkg.mod:MyPolicy``, ``my_policy.py:MyPolicy:k=v``) into policy objects, failing at start
with the spec named. Classes are found by the policies registry (``load_policy``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kvtier.policies.base import EvictionPolicy
from kvtier.policies.registry import PolicyNotFound, load_policy


class PolicySpecError(ValueError):
    """A policy spec that names no policy or passes bad arguments."""


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``name[:k=v,k=v]`` -> (name, kwargs); a ``module:Class`` name keeps its colon."""
    name, _, rest = spec.strip().partition(":")
    if rest and "=" not in rest.partition(":")[0]:  # module:Class[:k=v,...]
        cls, _, rest = rest.partition(":")
        name = f"{name}:{cls}"
    kwargs: dict[str, Any] = {}
    for part in filter(None, rest.split(",")):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise PolicySpecError(f"policy spec {spec!r}: expected key=value, got {part!r}")
        kwargs[key.strip()] = _parse_value(value.strip())
    return name, kwargs


def _load(kind: str, spec: str) -> tuple[type, dict[str, Any]]:
    name, kwargs = parse_spec(spec)
    try:
        return load_policy(name, kind), kwargs
    except (PolicyNotFound, ValueError) as exc:
        raise PolicySpecError(f"{kind} policy {spec!r}: {exc}") from None


def eviction_factory(spec: str) -> Callable[[int], EvictionPolicy]:
    """A callable ``capacity -> EvictionPolicy`` for ``spec``; arguments are checked here."""
    cls, kwargs = _load("eviction", spec)
    try:
        cls(1, **kwargs)
    except (TypeError, ValueError) as exc:
        raise PolicySpecError(f"eviction policy {spec!r}: {exc}") from None
    return lambda capacity: cls(capacity, **kwargs)


def make_policy(kind: str, spec: str) -> Any:
    """A placement, prefetch or migration policy instance."""
    cls, kwargs = _load(kind, spec)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise PolicySpecError(f"{kind} policy {spec!r}: {exc}") from None


def make_placement(spec: str) -> Any:
    return make_policy("placement", spec)


def make_prefetch(spec: str) -> Any:
    return make_policy("prefetch", spec)


def make_migration(spec: str) -> Any:
    return make_policy("migration", spec)
