"""Micro-batching: concurrent requests fused into one model call.

Requests are queued; a single collector task takes the first waiting request, then keeps
taking requests until ``max_batch_size`` are in hand or ``max_wait_ms`` have passed since the
first one, and runs the batch function on a dedicated worker thread, so the event loop keeps
accepting (and validating) requests while the model computes. While a batch runs, new requests
queue up and form the next batch: under load batches fill by themselves and nobody waits for the
timer; an idle service answers a lone request after at most ``max_wait_ms``.

One worker thread means one model call at a time: PyTorch parallelises inside the call, and two
concurrent calls would only compete for the same cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Pending(Generic[T, R]):
    item: T
    future: asyncio.Future[R]


class MicroBatcher(Generic[T, R]):
    """``await submit(x)`` returns ``fn([..., x, ...])[i]`` for x's place in its batch.

    ``fn`` maps a list of inputs to a list of results of the same length; if it raises, every
    request of that batch gets the exception. ``on_batch(size, seconds)`` is called after each
    call (metrics); ``initializer()`` once on the worker thread before its first call.
    """

    def __init__(self, fn: Callable[[list[T]], Sequence[R]], max_batch_size: int,
                 max_wait_ms: float,
                 on_batch: Callable[[int, float], None] | None = None,
                 initializer: Callable[[], None] | None = None) -> None:
        if max_batch_size < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch_size ({max_batch_size}) must be >= 1 and max_wait_ms "
                             f"({max_wait_ms}) >= 0")
        self.fn = fn
        self.max_batch_size = int(max_batch_size)
        self.max_wait = float(max_wait_ms) / 1000.0
        self.on_batch = on_batch
        self.initializer = initializer  # runs once on the worker thread (thread settings)
        self._queue: asyncio.Queue[_Pending[T, R]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._pool: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sigma-model",
                                        initializer=self.initializer)
        self._task = asyncio.create_task(self._collect(), name="micro-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._queue is not None:
            while not self._queue.empty():
                p = self._queue.get_nowait()
                if not p.future.done():
                    p.future.set_exception(RuntimeError("the service is shutting down"))
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._task = self._queue = self._pool = None

    async def submit(self, item: T) -> R:
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(item, fut))
        return await fut

    async def submit_many(self, items: Sequence[T]) -> list[R]:
        """Several inputs at once; they enter the queue together, so they share batches."""
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        loop = asyncio.get_running_loop()
        pend = [_Pending(x, loop.create_future()) for x in items]
        for p in pend:
            self._queue.put_nowait(p)
        return list(await asyncio.gather(*(p.future for p in pend)))

    async def _collect(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch_size:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), left))
                except TimeoutError:
                    break
            # Requests whose client went away (cancelled) need no answer.
            batch = [p for p in batch if not p.future.done()]
            if batch:
                await self._run(loop, batch)

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending[T, R]]) -> None:
        t0 = time.perf_counter()
        try:
            results = await loop.run_in_executor(self._pool, self.fn, [p.item for p in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch function returned {len(results)} results for "
                                   f"{len(batch)} inputs")
        except Exception as e:  # every waiting request learns of the failure
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(e)
            return
        finally:
            if self.on_batch is not None:
                self.on_batch(len(batch), time.perf_counter() - t0)
        for p, r in zip(batch, results, strict=True):
            if not p.future.done():
                p.future.set_result(r)
