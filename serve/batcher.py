"""The request queue and the one worker thread that runs the model.

Handlers on the event loop ``put`` jobs (one image each) and await their futures; the worker takes
the oldest live job, waits up to ``batch_wait`` for compatible ones (same ``key``) until the batch
holds ``max_batch`` images, and hands the batch to ``run``. Jobs that were cancelled (client gone,
handler timed out) are dropped unrun; jobs older than their deadline are answered with
``JobExpired`` unrun. The event loop never waits on model work.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any


class QueueFull(RuntimeError):
    """The queue holds --max-queue images; the client should retry later."""


class Draining(RuntimeError):
    """The server is shutting down and accepts no new work."""


class JobExpired(TimeoutError):
    """The job waited longer than --request-timeout and was dropped unrun."""


@dataclass(eq=False)
class Job:
    """One image's work: a runtime request, the batch key of its plan, and the future its handler awaits."""

    request: Any
    key: Hashable
    deadline: float
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    cancelled: bool = False

    def resolve(self, result: Any = None, error: BaseException | None = None) -> None:
        """Set the future from any thread (ignored when the handler already gave up)."""
        def apply() -> None:
            if self.future.done() or (self.cancelled and error is not None):
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        try:
            self.loop.call_soon_threadsafe(apply)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


@dataclass
class Running:
    jobs: list[Job]
    interrupt: threading.Event = field(default_factory=threading.Event)
    step: int = 0
    total: int = 0
    started: float = field(default_factory=time.monotonic)
    interrupted: bool = False


class Batcher:
    """A FIFO of jobs and the worker thread that runs them in batches through ``run(jobs, running)``."""

    def __init__(self, run: Callable[[list[Job], Running], None], max_batch: int, batch_wait: float,
                 max_queue: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._run = run
        self.max_batch = max_batch
        self.batch_wait = batch_wait
        self.max_queue = max_queue
        self._clock = clock
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self.running: Running | None = None
        self._accepting = True
        self._stopped = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="linfusion-serve-worker", daemon=True)
        self._thread.start()

    def queued(self) -> int:
        return len(self._queue)

    def busy(self) -> bool:
        return bool(self._queue) or self.running is not None

    def put(self, jobs: list[Job]) -> None:
        """Queue all of a request's jobs, or none: raises QueueFull or Draining."""
        with self._cond:
            if not self._accepting:
                raise Draining("the server is shutting down; retry on another replica")
            if len(self._queue) + len(jobs) > self.max_queue:
                raise QueueFull(f"the queue is full ({len(self._queue)} of {self.max_queue} images waiting); "
                                f"retry later")
            self._queue.extend(jobs)
            self._cond.notify_all()

    def cancel(self, jobs: list[Job]) -> None:
        """Drop queued jobs unrun; a running batch whose every job is cancelled stops at its next step."""
        with self._cond:
            for job in jobs:
                job.cancelled = True
            self._queue = deque(j for j in self._queue if not j.cancelled)
            running = self.running
            if running is not None and all(j.cancelled for j in running.jobs):
                running.interrupt.set()
            self._cond.notify_all()

    def interrupt(self) -> bool:
        """Stop the running batch at its next step (its images are decoded as they are)."""
        running = self.running
        if running is None:
            return False
        running.interrupted = True
        running.interrupt.set()
        return True

    def stop_accepting(self) -> None:
        with self._cond:
            self._accepting = False

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing is queued or running (True), or until ``timeout`` passes (False)."""
        end = self._clock() + timeout
        with self._cond:
            while self.busy():
                left = end - self._clock()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
        return True

    def close(self, error: BaseException | None = None) -> None:
        """Stop the worker after its current batch; queued jobs get ``error`` (default: Draining)."""
        with self._cond:
            self._accepting = False
            self._stopped = True
            left, self._queue = list(self._queue), deque()
            self._cond.notify_all()
        for job in left:
            job.resolve(error=error or Draining("the server shut down before this request ran"))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            running = Running(batch)
            now = self._clock()
            for job in batch:
                job.started = now
            self.running = running
            try:
                self._run(batch, running)
            except BaseException as exc:  # noqa: BLE001 - every job must be answered whatever happened
                for job in batch:
                    job.resolve(error=exc)
            finally:
                with self._cond:
                    self.running = None
                    self._cond.notify_all()

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while True:
                self._drop_dead()
                if self._queue:
                    break
                if self._stopped:
                    return None
                self._cond.wait(0.5)
            first = self._queue.popleft()
            batch = [first]
            until = self._clock() + self.batch_wait
            while len(batch) < self.max_batch and not self._stopped:
                self._drop_dead()
                for job in list(self._queue):
                    if len(batch) < self.max_batch and job.key == first.key:
                        self._queue.remove(job)
                        batch.append(job)
                left = until - self._clock()
                if len(batch) >= self.max_batch or left <= 0:
                    break
                self._cond.wait(left)
            return batch

    def _drop_dead(self) -> None:
        """Remove cancelled jobs and answer expired ones (caller holds the lock)."""
        now = self._clock()
        live = deque()
        for job in self._queue:
            if job.cancelled:
                continue
            if now > job.deadline:
                job.resolve(error=JobExpired("the request waited longer than --request-timeout and was dropped"))
                continue
            live.append(job)
        self._queue = live
