"""One loaded Pipeline, its batcher and its state (loading, ready, draining), shared by the routes."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from linfusion.runtime.request import GenerationError, GenerationRequest

from .api import ApiError
from .batcher import Batcher, Draining, Job, JobExpired, Running
from .config import ServeConfig
from .metrics import Metrics

log = logging.getLogger("linfusion.serve")


class NotReady(RuntimeError):
    """The models are still loading (or failed to load)."""


class ClientGone(RuntimeError):
    """The client disconnected; its queued work was dropped."""


@dataclass
class Result:
    output: Any
    """The runtime's PipelineOutput for one image."""
    batch: int
    queue_wait: float
    interrupted: bool


class Service:
    """The model side of the server: everything here is safe to call from the event loop."""

    def __init__(self, config: ServeConfig, pipeline: Any = None,
                 on_fatal: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.pipe = pipeline
        self.on_fatal = on_fatal
        self.instance = uuid.uuid4().hex[:12]
        """Names this process (or Ray replica) on /readyz."""
        self.load_error: str | None = None
        self.load_seconds: float | None = None
        self.draining = False
        self.batch_seconds = 1.0
        """Running mean of a batch's seconds, for Retry-After."""
        self.batcher = Batcher(self._run, config.max_batch, config.batch_wait_ms / 1000, config.max_queue)
        self.metrics = Metrics(queue_depth=self.batcher.queued)
        self._started = False

    # lifecycle -----------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.pipe is not None and not self.draining

    def start(self) -> None:
        """Start the worker, and load the pipeline in a thread unless one was given (``/readyz`` waits)."""
        if self._started:
            return
        self._started = True
        self.batcher.start()
        if self.pipe is None:
            threading.Thread(target=self._load, name="linfusion-serve-load", daemon=True).start()
        else:
            self.metrics.ready.set(1)

    def _load(self) -> None:
        from linfusion.runtime import Pipeline

        start = time.perf_counter()
        try:
            pipe = Pipeline.from_export(self.config.directory, backend=self.config.backend,
                                        verify=self.config.verify, intra_op_threads=self.config.threads,
                                        cache_dir=self.config.cache)
        except Exception as exc:  # noqa: BLE001 - reported on /readyz and in the log, then the server exits
            self.load_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.error("cannot load %s: %s", self.config.directory, self.load_error)
            if self.on_fatal is not None:
                self.on_fatal(self.load_error)
            return
        self.load_seconds = time.perf_counter() - start
        self.pipe = pipe
        self.metrics.ready.set(0 if self.draining else 1)
        log.info("loaded %s (%s backend) in %.2fs; ready", self.config.directory, pipe.backend, self.load_seconds)

    def drain(self, timeout: float) -> bool:
        """Blocking: refuse new work, finish what is queued and running within ``timeout`` seconds."""
        self.draining = True
        self.metrics.ready.set(0)
        self.batcher.stop_accepting()
        finished = self.batcher.wait_idle(timeout)
        if not finished:
            log.warning("drain timeout (%.0fs) passed with work left; answering it 503", timeout)
        self.batcher.close()
        return finished

    def close(self) -> None:
        self.draining = True
        self.batcher.close()

    # requests ------------------------------------------------------------------------------------
    async def submit(self, requests: list[GenerationRequest], timeout: float | None = None) -> list[Job]:
        """Check every request (400 before queuing), then queue one job per image.

        ``timeout``: the client's own deadline in seconds (at most --request-timeout)."""
        if self.draining:
            raise Draining("the server is shutting down; retry on another replica")
        if self.pipe is None:
            raise NotReady(self.load_error and f"the model failed to load: {self.load_error}"
                           or "the model is still loading; retry shortly")
        keys = await asyncio.to_thread(self._keys, requests)
        loop = asyncio.get_running_loop()
        limit = self.config.request_timeout
        deadline = time.monotonic() + (limit if timeout is None else min(timeout, limit))
        jobs = [Job(r, k, deadline, loop, loop.create_future()) for r, k in zip(requests, keys)]
        self.batcher.put(jobs)
        return jobs

    def _keys(self, requests: list[GenerationRequest]) -> list[Any]:
        from linfusion.runtime.batching import batch_key
        from linfusion.runtime.hires import plan_stages, resolve_hires

        keys = []
        for request in requests:
            chain = resolve_hires(request)
            if chain is not None:  # the staged chain: checked stage by stage, never batched
                plan_stages(self.pipe, request, chain)
                keys.append(("hires", id(request)))
                continue
            plan = self.pipe.plan(request)
            if plan.height * plan.width > self.config.max_pixels:
                raise ApiError(400, f"{plan.width}x{plan.height} is {plan.height * plan.width} pixels; this server "
                                    f"allows at most {self.config.max_pixels} (--max-pixels)")
            keys.append(batch_key(self.pipe, plan))
        return keys

    async def wait(self, jobs: list[Job], is_disconnected: Callable[[], Any], poll: float = 0.25) -> list[Result]:
        """The jobs' results; cancels them when the client disconnects or the deadline passes."""
        futures = [job.future for job in jobs]
        try:
            while True:
                pending = [f for f in futures if not f.done()]
                failed = [f for f in futures if f.done() and f.exception() is not None]
                if failed:
                    raise failed[0].exception()
                if not pending:
                    return [f.result() for f in futures]
                left = jobs[0].deadline - time.monotonic()
                if left <= 0:
                    raise JobExpired("the request took longer than --request-timeout and was dropped")
                await asyncio.wait(pending, timeout=min(poll, left))
                if not all(f.done() for f in futures) and await is_disconnected():
                    raise ClientGone("the client disconnected")
        except BaseException:
            self.batcher.cancel(jobs)
            for f in futures:
                if f.done() and not f.cancelled():
                    f.exception()  # retrieved: no "never retrieved" warning
            raise

    def retry_after(self) -> int:
        batches = self.batcher.queued() / max(self.config.max_batch, 1) + 1
        return max(1, round(batches * self.batch_seconds))

    def progress(self) -> dict[str, Any]:
        """GET /sdapi/v1/progress, in AUTOMATIC1111's shape."""
        running = self.batcher.running
        queued = self.batcher.queued()
        state = {"skipped": False, "interrupted": False, "job": "", "job_count": queued, "job_timestamp": "0",
                 "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
        if running is None:
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
        step, total = running.step, running.total
        elapsed = time.monotonic() - running.started
        done = step / total if total else 0.0
        eta = elapsed / done - elapsed if done > 0 else self.batch_seconds
        state.update(job=f"batch of {len(running.jobs)}", job_count=queued + 1, sampling_step=step,
                     sampling_steps=total, interrupted=running.interrupted,
                     job_timestamp=time.strftime("%Y%m%d%H%M%S"))
        return {"progress": round(done, 4), "eta_relative": round(max(eta, 0.0), 3), "state": state,
                "current_image": None, "textinfo": None}

    # the worker thread ---------------------------------------------------------------------------
    def _run(self, jobs: list[Job], running: Running) -> None:
        from linfusion.runtime.batching import generate_batch

        live = [job for job in jobs if not job.cancelled]
        if not live:
            return

        def on_step(step: int, total: int) -> None:
            running.step, running.total = step, total

        start = time.perf_counter()
        try:
            if len(live) == 1 and live[0].request.hires is not None:  # the chain (its key is its own)
                outputs = [self.pipe.generate(live[0].request, callback=on_step)]
            else:
                outputs = generate_batch(self.pipe, [job.request for job in live], callback=on_step,
                                         interrupt=running.interrupt)
        except GenerationError as exc:
            if len(live) == 1:
                live[0].resolve(error=exc)
                return
            log.warning("batch of %d refused (%s); running its requests one by one", len(live), exc)
            for job in live:
                self._run([job], running)
            return
        seconds = time.perf_counter() - start
        self.batch_seconds = 0.8 * self.batch_seconds + 0.2 * seconds
        self.metrics.batch_size.observe(len(live))
        self.metrics.unet_step.observe(outputs[0].timings.get("unet_per_step", 0.0))
        self.metrics.steps.inc(outputs[0].timings.get("steps_run", 0.0))
        for job, output in zip(live, outputs):
            self.metrics.queue_wait.observe(job.started - job.created)
            if not job.cancelled:
                self.metrics.images.inc(len(output.images))
            job.resolve(Result(output, len(live), job.started - job.created, running.interrupted))
