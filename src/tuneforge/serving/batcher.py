"""Dynamic micro-batching: texts from concurrent requests are grouped into one forward pass.

A request puts its texts on a queue and awaits a future. One worker task takes the first waiting
request and the ones queued behind it, runs the model once in a worker thread (the event loop keeps
accepting requests), and answers every request.

Waiting to fill a batch only happens under load: when the last batch held several requests, or more
were queued as it ended, the next batch waits up to `max_wait_ms` for more. The clients just answered
come back within a few ms, so the batch holds every active client instead of alternating half
batches (40 vs 28 req/s at 16 clients on 2 CPU cores). An idle server answers a lone request at once.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable


@dataclass
class _Job:
    texts: list[str]
    future: asyncio.Future


class MicroBatcher:
    def __init__(self, predict: Callable[[list[str]], list[dict]], max_batch_size: int = 64, max_wait_ms: float = 5.0):
        self.predict = predict
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self._under_load = False  # the last batch held several requests, or more were queued as it ended
        # one dedicated thread runs every forward pass: with a pool, each new thread gets its own malloc
        # arena and the server's memory creeps up under load
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tuneforge-model")

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)  # a forward pass under way finishes before the log closes

    async def submit(self, texts: list[str]) -> list[dict]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Job(texts, future))
        return await future

    async def _collect(self) -> list[_Job]:
        """The first waiting request, everything already queued behind it, then (under load, if max_wait > 0)
        whatever arrives before the deadline, up to max_batch_size texts."""
        jobs = [await self.queue.get()]
        size = len(jobs[0].texts)
        deadline = time.perf_counter() + (self.max_wait if self._under_load else 0.0)
        while size < self.max_batch_size:
            try:
                job = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self.queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            jobs.append(job)
            size += len(job.texts)
        return jobs

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [job for job in await self._collect() if not job.future.done()]  # skip timed-out requests
            if not jobs:
                continue
            texts = [t for job in jobs for t in job.texts]
            try:
                results = await loop.run_in_executor(self._executor, self.predict, texts)
            except Exception as err:  # answer every waiting request, keep serving
                self._under_load = len(jobs) > 1 or not self.queue.empty()
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(err)
                continue
            self._under_load = len(jobs) > 1 or not self.queue.empty()
            start = 0
            for job in jobs:
                if not job.future.done():
                    job.future.set_result(results[start : start + len(job.texts)])
                start += len(job.texts)
