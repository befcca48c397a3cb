"""Dynamic micro-batching: texts from concurrent requests are grouped into one forward pass.

A request puts its texts on a queue and awaits a future. One worker task takes the first waiting
request and the ones queued behind it (waiting up to `max_wait_ms` for more), runs the model once in
a worker thread (the event loop keeps accepting requests), and answers every request.
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
        self._executor.shutdown(wait=False)

    async def submit(self, texts: list[str]) -> list[dict]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Job(texts, future))
        return await future

    async def _collect(self) -> list[_Job]:
        """The first waiting request, everything already queued behind it, then (if max_wait > 0) whatever
        arrives before the deadline, up to max_batch_size texts. With max_wait 0 batching is greedy: no
        added latency when idle, while under load the requests that queue during a forward pass share the next."""
        jobs = [await self.queue.get()]
        size = len(jobs[0].texts)
        deadline = time.perf_counter() + self.max_wait
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
            jobs = await self._collect()
            texts = [t for job in jobs for t in job.texts]
            try:
                results = await loop.run_in_executor(self._executor, self.predict, texts)
            except Exception as err:  # answer every waiting request, keep serving
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(err)
                continue
            start = 0
            for job in jobs:
                if not job.future.done():
                    job.future.set_result(results[start : start + len(job.texts)])
                start += len(job.texts)
