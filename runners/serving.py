"""BurstGPT live serving replay: trace arrivals, a FIFO queue, batches, a virtual clock.

Requests arrive at their trace timestamps (times ``--time-scale``), wait in one FIFO queue
and are served in static batches of up to ``--batch-size``: a batch runs to completion
(the reference ``generate`` has no continuous batching) and the virtual clock advances by
its service time. With the model that is the measured wall time of ``generate`` (plus the
tiered backend's fetch time under ``--backend sim``); a request's latency is queue wait +
service. The model-free mode runs the same arrival process in ``serving_sim``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgspec
import numpy as np

from kvtier.runners.prepare import Prepared
from kvtier.schema import PERCENTILE_METHOD, LatencyMs, Serving

SERVING_FILE = "serving_requests.jsonl"
#: the columns of ``serving_requests.jsonl``, live and model-free alike: one line per served
#: request, every time in seconds on the virtual clock (0 = the first arrival)
SERVING_FIELDS = (
    "request_id",  # the trace's integer id (requests.jsonl maps it to the dataset row)
    "sample_id",  # the loader's id of the request
    "arrival_s",  # arrival (trace time x --time-scale)
    "start_s",  # its batch starts
    "finish_s",  # it is done
    "queue_s",  # start_s - arrival_s
    "service_s",  # finish_s - start_s
    "latency_s",  # finish_s - arrival_s = queue_s + service_s
    "batch",  # 0-based batch number, in serving order
    "batch_size",  # requests in its batch
    "prompt_tokens",  # prompt length in tokens
    "max_new_tokens",  # its generation cap: min(the request's own, --max-new-tokens)
)


def serving_row(request_id: int | None, sample_id: str, arrival_s: float, start_s: float,
                finish_s: float, batch: int, batch_size: int, prompt_tokens: int,
                max_new_tokens: int) -> dict:  # fmt: skip
    """One line of ``serving_requests.jsonl`` (``SERVING_FIELDS``, in that order)."""
    arrival_s, start_s, finish_s = float(arrival_s), float(start_s), float(finish_s)
    return {"request_id": request_id, "sample_id": sample_id, "arrival_s": arrival_s, "start_s": start_s,
            "finish_s": finish_s, "queue_s": start_s - arrival_s,
            "service_s": finish_s - start_s, "latency_s": finish_s - arrival_s,
            "batch": int(batch), "batch_size": int(batch_size),
            "prompt_tokens": int(prompt_tokens), "max_new_tokens": int(max_new_tokens)}  # fmt: skip


@dataclass(slots=True)
class Completed:
    """One served request on the virtual clock (seconds from the first arrival)."""

    request_id: int | None  # the trace's request id (None if the batch never began)
    sample_id: str  # the loader's id (requests.jsonl maps one to the other)
    arrival_s: float
    start_s: float
    finish_s: float
    batch: int
    batch_size: int
    prompt_tokens: int
    max_new_tokens: int

    @property
    def latency_s(self) -> float:
        return self.finish_s - self.arrival_s

    @property
    def queue_s(self) -> float:
        return self.start_s - self.arrival_s


def arrival_times(items: Sequence[Prepared], time_scale: float) -> np.ndarray:
    """Arrival of each item on the virtual clock: trace seconds from the first request,
    multiplied by ``time_scale`` (< 1 compresses the trace, 0 = all at once)."""
    if not 0 <= time_scale < float("inf"):
        raise ValueError(f"--time-scale must be a finite number >= 0, got {time_scale}")
    raw = np.array([it.request.arrival_s or 0.0 for it in items], dtype=np.float64)
    if raw.size == 0:
        return raw
    return (raw - raw.min()) * time_scale


def replay(
    items: Sequence[Prepared],
    batch_size: int,
    time_scale: float,
    serve: Callable[[list[Prepared]], float],
    on_done: Callable[[list[Completed]], None] | None = None,
) -> list[Completed]:
    """Serve ``items`` FIFO by arrival; ``serve(batch)`` returns the batch's service seconds.

    A batch starts when the server is free and at least one request waits; it takes the
    longest-waiting ``batch_size`` requests that have arrived by then.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    arrivals = arrival_times(items, time_scale)
    order = np.argsort(arrivals, kind="stable")
    sorted_arrivals = arrivals[order]
    done: list[Completed] = []
    clock = 0.0
    head = 0  # next not-yet-served position in arrival order
    n = len(order)
    batch_no = 0
    while head < n:
        clock = max(clock, float(sorted_arrivals[head]))
        # FIFO: everything that has arrived by `clock`, oldest first, up to batch_size
        arrived = int(np.searchsorted(sorted_arrivals, clock, side="right"))
        end = min(arrived, head + batch_size)
        idx = order[head:end]
        batch = [items[i] for i in idx]
        service = float(serve(batch))
        if service < 0:
            raise ValueError(f"serve() returned a negative service time {service}")
        finished = [
            Completed(
                request_id=items[i].trace_id,
                sample_id=items[i].request_id,
                arrival_s=float(arrivals[i]),
                start_s=clock,
                finish_s=clock + service,
                batch=batch_no,
                batch_size=len(batch),
                prompt_tokens=len(items[i].tokens),
                max_new_tokens=items[i].max_new_tokens,
            )
            for i in idx
        ]
        done.extend(finished)
        if on_done is not None:
            on_done(finished)
        clock += service
        head = end
        batch_no += 1
    return done


def latency_ms(latencies_s: Sequence[float] | np.ndarray) -> LatencyMs:
    """p50/p95/p99/max of latencies in milliseconds (nulls for an empty sample)."""
    arr = np.asarray(latencies_s, dtype=np.float64) * 1e3
    if arr.size == 0:
        return LatencyMs(p50=None, p95=None, p99=None, max=None)
    p50, p95, p99 = np.percentile(arr, [50, 95, 99], method=PERCENTILE_METHOD)
    return LatencyMs(p50=float(p50), p95=float(p95), p99=float(p99), max=float(arr.max()))


def serving_section(done: Sequence[Completed], batch_size: int, cap: int) -> Serving:
    """``summary.serving`` for a finished (or interrupted) replay."""
    return Serving(
        requests=len(done),
        latency_ms=latency_ms([c.latency_s for c in done]),
        batch_size=batch_size,
        max_new_tokens_cap=cap,
    )


class CompletedLog:
    """Appends one ``SERVING_FIELDS`` line per served request, so an interrupted replay keeps
    its rows."""

    def __init__(self, path) -> None:
        self._fh = open(path, "wb")
        self._enc = msgspec.json.Encoder()

    def write(self, rows: Sequence[Completed]) -> None:
        for c in rows:
            row = serving_row(c.request_id, c.sample_id, c.arrival_s, c.start_s, c.finish_s,
                              c.batch, c.batch_size, c.prompt_tokens, c.max_new_tokens)  # fmt: skip
            self._fh.write(self._enc.encode(row) + b"\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()
