"""Model-free serving replay: an arrival trace through a FIFO queue and a batching server in
simpy virtual time, with service times from a per-step cost model instead of a model.

This is the laptop version of the BurstGPT serving replay: the same arrivals (BurstGPT
timestamps x ``time_scale``, Mooncake, Azure), the same FIFO queue and batches of up to
``batch_size`` requests, generation capped at ``g = min(response tokens, max_new_tokens)``,
and the same ``summary.serving`` section (``kvtier.schema.Serving``).

Queue: a batch starts when the server is free and the queue is non-empty; it takes the
queue head and up to ``batch_size - 1`` requests queued behind it (requests arriving at the
very instant the server frees up count as queued). Batches are static: the next one starts
when this one is done.

A forward over ``rows`` sequences costs ``prefill_base_s + prefill_s_per_token x tokens``
(prefill) or ``decode_base_s + decode_s_per_seq x rows + decode_s_per_ctx_token x
sum(context)`` plus ``extra_step_time(decoding request ids, step)`` (one decode step, e.g. a
tiered backend's KV fetch time). Two engines serve a batch:

- ``reference`` (default; what ``kvtier run`` does with the model, via ``generate.py``):
  one prefill of the shortest prompt ``P_min`` for every row, then 1-token forwards over all
  rows at positions ``P_min .. max(P) + max(g) - 2`` (longer prompts are teacher-forced),
  so every step costs ``rows = batch`` and context ``batch x (position + 1)``; the hook sees
  the rows past their prompt and within their cap; every request finishes with the batch.
- ``per_request``: one prefill of all prompts gives each request its first token; decode
  step ``s`` runs only the requests still generating (context ``prompt + s + 1``); a
  request finishes after its own ``g - 1`` steps, the batch when its longest one does.

Per request: queue (``queue_s``) = batch start - arrival, service = finish - batch start,
latency = queue + service. Percentiles use numpy's default linear method.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import msgspec
import numpy as np

from kvtier.runners.requests import Request, Workload
from kvtier.runners.serving import serving_row
from kvtier.schema import TRACE_FILE, LatencyMs, Serving

#: ``extra_step_time(active_request_ids, step) -> seconds`` added to a decode step
ExtraStepTime = Callable[[Sequence[str], int], float]


@dataclass(frozen=True, slots=True)
class StepCostModel:
    """Seconds per prefill and per decode step as a linear function of the batch's shape."""

    prefill_base_s: float = 0.0
    prefill_s_per_token: float = 0.0
    decode_base_s: float = 0.0
    decode_s_per_seq: float = 0.0
    decode_s_per_ctx_token: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) \
                    or v < 0:
                raise ValueError(f"StepCostModel.{f.name} must be a finite number >= 0, "
                                 f"got {v!r}")

    @classmethod
    def from_dict(cls, d: dict) -> StepCostModel:
        """From a config mapping; an unknown key is an error naming it."""
        known = {f.name for f in fields(cls)}
        for key in d:
            if key not in known:
                raise ValueError(f"StepCostModel: unknown field {key!r} "
                                 f"(known: {', '.join(sorted(known))})")
        return cls(**d)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def prefill_time(self, prompt_lens: np.ndarray) -> float:
        """One batched prefill of these prompts."""
        return self.prefill_base_s + self.prefill_s_per_token * float(np.sum(prompt_lens))

    def decode_step_times(self, active: np.ndarray, context: np.ndarray) -> np.ndarray:
        """Decode step times for arrays of (active sequences, summed context tokens)."""
        return (self.decode_base_s + self.decode_s_per_seq * np.asarray(active, np.float64)
                + self.decode_s_per_ctx_token * np.asarray(context, np.float64))

    @classmethod
    def calibrate(
        cls,
        prefill: Iterable[tuple[float, float]] = (),
        decode: Iterable[tuple[float, float, float]] = (),
    ) -> StepCostModel:
        """Fit the coefficients to measured numbers by non-negative least squares.

        ``prefill``: ``(prompt tokens in the prefill, seconds)`` pairs;
        ``decode``: ``(active sequences, summed context tokens, seconds)`` triples, e.g. from
        ``decode_samples_from_trace``. A part with no samples keeps zero coefficients.
        """
        pre = np.asarray(list(prefill), dtype=np.float64).reshape(-1, 2)
        dec = np.asarray(list(decode), dtype=np.float64).reshape(-1, 3)
        p = _nnls(np.column_stack([np.ones(len(pre)), pre[:, 0]]), pre[:, 1]) \
            if len(pre) else np.zeros(2)
        q = _nnls(np.column_stack([np.ones(len(dec)), dec[:, 0], dec[:, 1]]), dec[:, 2]) \
            if len(dec) else np.zeros(3)
        return cls(prefill_base_s=float(p[0]), prefill_s_per_token=float(p[1]),
                   decode_base_s=float(q[0]), decode_s_per_seq=float(q[1]),
                   decode_s_per_ctx_token=float(q[2]))


def _nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact non-negative least squares for a handful of columns: the best of the
    unconstrained fits over every column subset whose coefficients are all >= 0."""
    n = a.shape[1]
    best, best_err = np.zeros(n), float(np.sum(b * b))
    for k in range(1, n + 1):
        for cols in itertools.combinations(range(n), k):
            x, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
            if np.any(x < 0):
                continue
            err = float(np.sum((a[:, cols] @ x - b) ** 2))
            if err < best_err - 1e-18 * max(1.0, best_err):
                best, best_err = np.zeros(n), err
                best[list(cols)] = x
    return best


class _Tier(msgspec.Struct):
    latency_us: float | None


class _Fetch(msgspec.Struct):
    hbm: _Tier


class _Rec(msgspec.Struct):
    """The few trace-record fields calibration reads (the rest are ignored when decoding)."""

    layer_id: int
    step_idx: int
    seq_len_current: int
    kv_fetch: _Fetch


def decode_samples_from_trace(path: str | Path) -> list[tuple[int, int, float]]:
    """``(active sequences, summed context tokens, seconds)`` per measured decode step of a
    recorded trace (``trace_steps.jsonl`` or its directory).

    Uses the HBM tier's ``latency_us`` (the measured step wall time the tracer records) on
    the first layer's records; the rows of one forward are consecutive records sharing
    ``step_idx`` and that latency, which groups them. Records without a latency are ignored.
    """
    path = Path(path)
    if path.is_dir():
        path = path / TRACE_FILE
    dec = msgspec.json.Decoder(_Rec)
    recs = []
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                recs.append(dec.decode(line))
            except msgspec.DecodeError as exc:
                raise ValueError(f"{path}: line {lineno}: {exc}") from exc
    if not recs:
        return []
    first_layer = min(r.layer_id for r in recs)
    groups: list[tuple[float, list[int]]] = []
    prev = None
    for r in recs:
        lat = r.kv_fetch.hbm.latency_us
        if r.layer_id != first_layer or lat is None:
            prev = None
            continue
        if (r.step_idx, lat) != prev:
            prev = (r.step_idx, lat)
            groups.append((lat, []))
        groups[-1][1].append(r.seq_len_current)
    return [(len(ctx), int(sum(ctx)), lat / 1e6) for lat, ctx in groups]


@dataclass(slots=True)
class SimResult:
    """Per-request outcome of a simulated replay, in arrival (FIFO) order."""

    request_ids: list[str]
    arrival_s: np.ndarray
    start_s: np.ndarray
    finish_s: np.ndarray
    prompt_len: np.ndarray
    gen_tokens: np.ndarray
    batch_index: np.ndarray
    batch_size: int
    max_new_tokens_cap: int

    @property
    def queue_s(self) -> np.ndarray:
        return self.start_s - self.arrival_s

    @property
    def service_s(self) -> np.ndarray:
        return self.finish_s - self.start_s

    @property
    def latency_s(self) -> np.ndarray:
        return self.queue_s + self.service_s

    @property
    def batches(self) -> int:
        return int(self.batch_index.max()) + 1 if len(self.batch_index) else 0

    def serving(self) -> Serving:
        """The ``summary.serving`` section (latency = queue wait + service, in ms)."""
        lat = self.latency_s * 1e3
        if len(lat):
            p50, p95, p99 = (float(x) for x in np.percentile(lat, [50, 95, 99]))
            ms = LatencyMs(p50=p50, p95=p95, p99=p99, max=float(lat.max()))
        else:
            ms = LatencyMs(p50=None, p95=None, p99=None, max=None)
        return Serving(requests=len(lat), latency_ms=ms, batch_size=self.batch_size,
                       max_new_tokens_cap=self.max_new_tokens_cap)

    def per_request(self) -> list[dict]:
        """One ``serving_requests.jsonl`` line per request, in FIFO order: the live replay's
        columns (``serving.SERVING_FIELDS``), times in seconds; ``request_id`` is its integer
        id (0, 1, 2, ... in FIFO admission order, as in a traced run), ``sample_id`` the
        loader's id."""
        sizes = np.bincount(self.batch_index) if len(self.batch_index) else np.zeros(0, int)
        return [
            serving_row(i, rid, self.arrival_s[i], self.start_s[i], self.finish_s[i],
                        self.batch_index[i], sizes[self.batch_index[i]], self.prompt_len[i],
                        self.gen_tokens[i])
            for i, rid in enumerate(self.request_ids)
        ]


ENGINES = ("reference", "per_request")


def _checked_extra(extra_step_time: ExtraStepTime, act: list[str], k: int) -> float:
    x = float(extra_step_time(act, k))
    if not math.isfinite(x) or x < 0:
        raise ValueError(f"extra_step_time returned {x!r} at step {k}; "
                         "expected finite seconds >= 0")
    return x


def _closed_per_request(cost: StepCostModel, p: list[int], g: list[int]) -> list[float]:
    """``per_request`` finish offsets without a hook, in closed form: between two
    consecutive finishing steps the active set is fixed, so its steps sum to
    ``count x (base + per_seq x active) + per_ctx x (count x sum(P) + active x sum(s + 1))``.
    """
    m = len(p)
    t = cost.prefill_base_s + cost.prefill_s_per_token * sum(p)
    d = [max(x - 1, 0) for x in g]
    active, sum_p, prev = m, sum(p), 0
    out = [0.0] * m
    for j in sorted(range(m), key=d.__getitem__):
        if d[j] > prev:
            cnt, b = d[j] - prev, d[j]
            t += (cnt * (cost.decode_base_s + cost.decode_s_per_seq * active)
                  + cost.decode_s_per_ctx_token
                  * (cnt * sum_p + active * ((b * (b + 1) - prev * (prev + 1)) // 2)))
            prev = b
        out[j] = t
        active -= 1
        sum_p -= p[j]
    return out


def _closed_reference(cost: StepCostModel, p: list[int], g: list[int],
                      max_seq_len: int | None) -> list[float]:
    """``reference`` finish offsets without a hook: ``n`` forwards over all rows at
    positions ``P_min + k`` sum to ``n x (base + per_seq x rows) + per_ctx x rows x
    (n x (P_min + 1) + n (n - 1) / 2)``."""
    rows, p_min = len(p), min(p)
    total_len = max(p) + max(g)
    if max_seq_len is not None:
        total_len = min(total_len, max_seq_len)
    n = max(total_len - p_min - 1, 0)
    t = (cost.prefill_base_s + cost.prefill_s_per_token * rows * p_min
         + n * (cost.decode_base_s + cost.decode_s_per_seq * rows)
         + cost.decode_s_per_ctx_token * rows * (n * (p_min + 1) + n * (n - 1) // 2))
    return [t] * rows


def _offsets_per_request(
    cost: StepCostModel,
    prompt: np.ndarray,
    gen: np.ndarray,
    ids: list[str],
    extra_step_time: ExtraStepTime | None,
) -> np.ndarray:
    """Finish time of each batch member (``per_request`` engine), from the batch start."""
    pre = cost.prefill_time(prompt)
    steps = np.maximum(gen - 1, 0)  # decode steps after the prefill's first token
    n_steps = int(steps.max()) if len(steps) else 0
    if n_steps == 0:
        return np.full(len(prompt), pre)
    s = np.arange(n_steps)  # 0-based decode step
    order = np.argsort(steps, kind="stable")
    sorted_steps = steps[order]
    # active at step s: requests with more than s decode steps
    first_active = np.searchsorted(sorted_steps, s, side="right")
    active = len(steps) - first_active
    suffix_prompt = np.concatenate([np.cumsum(prompt[order][::-1])[::-1], [0]])
    context = suffix_prompt[first_active] + (s + 1) * active
    times = cost.decode_step_times(active, context)
    if extra_step_time is not None:
        extra = np.array([_checked_extra(extra_step_time,
                                         [ids[i] for i in np.flatnonzero(steps > k)], k)
                          for k in range(n_steps)])
        times = times + extra
    done = pre + np.concatenate([[0.0], np.cumsum(times)])
    return done[steps]


def _offsets_reference(
    cost: StepCostModel,
    prompt: np.ndarray,
    gen: np.ndarray,
    ids: list[str],
    extra_step_time: ExtraStepTime | None,
    max_seq_len: int | None,
) -> np.ndarray:
    """Finish time of each batch member (``reference`` engine): all finish together."""
    rows = len(prompt)
    p_min = int(prompt.min())
    total_len = int(prompt.max()) + int(gen.max())
    if max_seq_len is not None:
        total_len = min(total_len, max_seq_len)
    pre = cost.prefill_base_s + cost.prefill_s_per_token * rows * p_min
    n_steps = max(total_len - p_min - 1, 0)  # 1-token forwards after the prefill
    pos = p_min + np.arange(n_steps)  # start position of each decode forward
    times = cost.decode_step_times(np.full(n_steps, rows), rows * (pos + 1))
    if extra_step_time is not None:
        last = prompt + gen - 2  # a row decodes at positions prompt .. prompt + g - 2
        extra = np.zeros(n_steps)
        for k, at in enumerate(pos.tolist()):
            live = np.flatnonzero((prompt <= at) & (at <= last))
            if len(live):
                extra[k] = _checked_extra(extra_step_time, [ids[i] for i in live], k)
        times = times + extra
    return np.full(rows, pre + float(np.sum(times)))


def simulate(
    requests: Sequence[Request],
    cost: StepCostModel,
    *,
    batch_size: int,
    max_new_tokens: int,
    time_scale: float = 1.0,
    extra_step_time: ExtraStepTime | None = None,
    on_finish: Callable[[str], None] | None = None,
    engine: str = "reference",
    max_seq_len: int | None = None,
    progress: bool = False,
) -> SimResult:
    """Replay ``requests`` (each with ``prompt_len`` and ``arrival_s``) through the server.

    ``time_scale`` multiplies inter-arrival times (0.5 = twice the rate; 0 = all at once);
    arrivals are shifted so the first is at t=0. ``max_new_tokens`` caps each request's
    ``max_new_tokens`` (response tokens; a request without one generates the cap).
    ``on_finish(request_id)`` is called as each request completes, in completion order.
    ``engine`` is ``reference`` (``generate.py``'s batch semantics, as the live replay) or
    ``per_request`` (see the module docstring); ``max_seq_len`` caps the reference engine's
    positions as the model's cache does (``None``: no cap).
    """
    import simpy
    from tqdm import tqdm

    _check_config(batch_size, max_new_tokens, time_scale)
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {'|'.join(ENGINES)}, got {engine!r}")
    if max_seq_len is not None and (isinstance(max_seq_len, bool)
                                    or not isinstance(max_seq_len, int) or max_seq_len < 1):
        raise ValueError(f"max_seq_len must be an int >= 1 or None, got {max_seq_len!r}")
    n = len(requests)
    arrival = np.empty(n)
    prompt = np.empty(n, dtype=np.int64)
    gen = np.empty(n, dtype=np.int64)
    for i, r in enumerate(requests):
        if r.arrival_s is None or not math.isfinite(r.arrival_s):
            raise ValueError(f"request {r.request_id}: arrival_s must be a finite number, "
                             f"got {r.arrival_s!r}")
        if isinstance(r.prompt_len, bool) or not isinstance(r.prompt_len, int) \
                or r.prompt_len < 0:
            raise ValueError(f"request {r.request_id}: prompt_len must be an int >= 0, "
                             f"got {r.prompt_len!r}")
        m = r.max_new_tokens
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 0):
            raise ValueError(f"request {r.request_id}: max_new_tokens must be an int >= 0 "
                             f"or None, got {m!r}")
        arrival[i] = r.arrival_s
        prompt[i] = r.prompt_len
        gen[i] = max_new_tokens if m is None else min(m, max_new_tokens)
    order = fifo_order(requests)
    arrival, prompt, gen = arrival[order], prompt[order], gen[order]
    ids = [requests[i].request_id for i in order]
    if n:
        arrival = (arrival - arrival[0]) * time_scale
    env = simpy.Environment()
    queue: deque[int] = deque()  # FIFO of request indices (O(1) at both ends)
    state = {"arrived": 0, "wake": None}  # wake: the event an idle server waits on
    bar = tqdm(total=n, desc="serving-sim", unit="req", disable=not progress)
    arr_list = arrival.tolist()

    def arrivals():
        due = 0.0  # compare with the last target, not env.now (float sums drift by an ulp)
        for i in range(n):
            if arr_list[i] > due:
                due = arr_list[i]
                yield env.timeout(max(due - env.now, 0.0))
            queue.append(i)
            state["arrived"] = i + 1
            wake = state["wake"]
            if wake is not None and not wake.triggered:
                wake.succeed()  # resumes the server after this instant's arrivals are in

    p_list, g_list = prompt.tolist(), gen.tolist()
    start_l, finish_l, batch_l = [0.0] * n, [0.0] * n, [0] * n

    def server():
        for b in itertools.count():
            if not queue:
                if state["arrived"] == n:
                    return
                state["wake"] = env.event()
                yield state["wake"]
                state["wake"] = None
            batch = [queue.popleft() for _ in range(min(batch_size, len(queue)))]
            t0 = env.now
            p, g = [p_list[i] for i in batch], [g_list[i] for i in batch]
            if extra_step_time is None:  # closed forms: no per-step work at all
                offsets = (_closed_reference(cost, p, g, max_seq_len) if engine == "reference"
                           else _closed_per_request(cost, p, g))
            else:
                args = (cost, np.asarray(p, dtype=np.int64), np.asarray(g, dtype=np.int64),
                        [ids[i] for i in batch], extra_step_time)
                offsets = (_offsets_reference(*args, max_seq_len) if engine == "reference"
                           else _offsets_per_request(*args)).tolist()
            for i, off in zip(batch, offsets, strict=True):
                start_l[i], finish_l[i], batch_l[i] = t0, t0 + off, b
            if on_finish is not None:
                for j in sorted(range(len(batch)), key=offsets.__getitem__):
                    on_finish(ids[batch[j]])
            bar.update(len(batch))
            yield env.timeout(max(offsets))
            nxt = state["arrived"]
            if nxt < n and arr_list[nxt] <= env.now:
                # arrivals due at this very instant join the queue before the next batch
                # forms: their pending timeout was scheduled before this one
                yield env.timeout(0)

    env.process(arrivals())
    env.process(server())
    env.run()
    bar.close()
    return SimResult(request_ids=ids, arrival_s=arrival, start_s=np.array(start_l),
                     finish_s=np.array(finish_l), prompt_len=prompt, gen_tokens=gen,
                     batch_index=np.array(batch_l, dtype=np.int64),
                     batch_size=batch_size, max_new_tokens_cap=max_new_tokens)


def fifo_order(requests: Sequence[Request]) -> np.ndarray:
    """Input indices of ``requests`` in FIFO (admission) order: by arrival, ties keeping input
    order. Position k in it is the request's integer id."""
    return np.argsort(np.array([r.arrival_s for r in requests], dtype=np.float64), kind="stable")


def simulate_workload(workload: Workload, cost: StepCostModel, **kwargs) -> SimResult:
    """``simulate`` over a loaded workload's requests (BurstGPT, Mooncake, Azure)."""
    return simulate(workload.requests, cost, **kwargs)


def _check_config(batch_size: int, max_new_tokens: int, time_scale: float) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
            or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if isinstance(time_scale, bool) or not isinstance(time_scale, int | float) \
            or not math.isfinite(time_scale) or time_scale < 0:
        raise ValueError(f"time_scale must be a finite number >= 0, got {time_scale!r}")
