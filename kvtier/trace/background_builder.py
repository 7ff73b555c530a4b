"""The tracer's record builder thread: steps are built while the GPU computes the next one.

A bounded queue of steps (``max_pending``) feeds one daemon thread. When the thread falls
behind, ``submit`` waits for a free slot (back-pressure: a step is never dropped) and counts
the wait and its seconds in ``stats``. An error while building is kept and raised (as
``RuntimeError``) by the caller's next ``drain`` or ``raise_error``; steps queued after it are
skipped but still released.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any


class BackgroundBuilder:
    """Runs ``build(job)`` for each submitted job on one thread, then ``release(job)`` (also
    after an error), at most ``max_pending`` (>= 1) jobs waiting. ``stats`` (a dict the owner
    reports) gets ``background_steps``, ``waits`` and ``wait_s`` added to."""

    def __init__(self, build: Callable[[Any], None], release: Callable[[Any], None],
                 max_pending: int, stats: dict) -> None:
        self._build, self._release, self.stats = build, release, stats
        self.jobs: queue.Queue = queue.Queue(maxsize=max_pending)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def busy(self) -> bool:
        """Whether a submitted job is queued or being built."""
        return self._thread is not None and self.jobs.unfinished_tasks > 0

    def submit(self, job: Any) -> None:
        """Queue a job (the thread starts with the first); wait, counted, while the queue is full."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="kvtier-trace-builder",
                                            daemon=True)
            self._thread.start()
        try:
            self.jobs.put_nowait(job)
        except queue.Full:  # the builder is behind: wait (counted), never drop the step
            t0 = time.perf_counter()
            self.jobs.put(job)
            self.stats["waits"] += 1
            self.stats["wait_s"] += time.perf_counter() - t0

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                if job is None:
                    return
                if self._error is None:
                    self._build(job)
                    self.stats["background_steps"] += 1
            except BaseException as exc:  # raised in the caller by its next call
                self._error = exc
            finally:
                if job is not None:
                    self._release(job)
                self.jobs.task_done()

    def drain(self) -> None:
        """Wait until every queued job is built; raise the builder's error, if any."""
        if self._thread is not None:
            self.jobs.join()
        self.raise_error()

    def raise_error(self) -> None:
        exc = self._error
        if exc is not None:
            self._error = None
            raise RuntimeError(f"trace record builder failed: {exc}") from exc

    def stop(self) -> None:
        """Build what is queued, then end the thread (a later ``submit`` starts a new one)."""
        if self._thread is not None:
            self.jobs.put(None)
            self._thread.join()
            self._thread = None
