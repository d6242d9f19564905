"""Dynamic batching: concurrent requests are gathered up to ``max_batch`` samples or until
``timeout_ms`` after the first one arrived, run as one batch on a worker thread, and each caller gets
its own rows back. With ``max_batch`` 1 every request runs alone (batching off).

Only requests of the same sample shape and dtype are merged (a dynamic-HxW model gets requests of
many sizes); the others wait, in arrival order, for a batch of their own. The queue is bounded
(``max_queue`` requests waiting: more are refused with 503 at once) and so is every wait
(``wait_s``: then 504). No exception ends the batch loop: a failed batch fails only its own
requests. If the loop ends anyway (cancelled, or a BaseException), ``not_ready()`` says why, every
waiting request is failed with 503 and new ones are refused; nothing waits for ever.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .threads import DaemonThreads

logger = logging.getLogger("cbam_deploy.serve")


class BatcherError(Exception):
    """The batcher cannot take or finish a request: 503 (queue full, stopped) or 504 (timed out)."""

    def __init__(self, message: str, status: int = 503) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Item:
    batch: np.ndarray
    future: asyncio.Future

    @property
    def key(self) -> tuple:
        return self.batch.shape[1:], self.batch.dtype


class DynamicBatcher:
    def __init__(self, run: Callable[[np.ndarray], np.ndarray | dict[str, np.ndarray]], max_batch: int = 8, timeout_ms: float = 5.0,
                 on_batch: Callable[[int], None] | None = None, max_queue: int = 256, wait_s: float = 30.0) -> None:
        self.run = run
        self.max_batch = max(1, max_batch)
        self.timeout = max(0.0, timeout_ms) / 1000.0
        self.on_batch = on_batch
        self.max_queue = max(1, max_queue)
        self.wait_s = wait_s
        self.task: asyncio.Task | None = None
        self._pending: deque[_Item] = deque()
        self._running: list[_Item] = []
        self._running_since: float | None = None
        self._arrived: asyncio.Event | None = None
        self._stopped: str | None = None
        self._worker: DaemonThreads | None = None

    @property
    def depth(self) -> int:
        """Requests waiting or running."""
        return len(self._pending) + len(self._running)

    def start(self) -> None:
        self._arrived = asyncio.Event()
        self._worker = DaemonThreads(1, "cbam-deploy-infer")
        self._stopped = None
        self.task = asyncio.get_running_loop().create_task(self._loop(), name="cbam-deploy-batcher")
        self.task.add_done_callback(self._ended)

    async def stop(self) -> None:
        self._stopped = "the server is shutting down"
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except BaseException:  # it ended either way; _ended has failed what was waiting
                pass
        if self._worker:
            self._worker.close()

    def not_ready(self) -> str | None:
        """None when requests are being served, else the reason (for the readiness endpoints)."""
        if self.task is None:
            return "the batcher has not started"
        if self.task.done():
            return self._stopped or "the batch loop has stopped"
        if self._running_since is not None:
            busy = asyncio.get_running_loop().time() - self._running_since
            if busy > self.wait_s:
                return f"one batch has been running for {busy:.0f} s"
        return None

    async def infer(self, batch: np.ndarray) -> np.ndarray:
        if self.task is None or self.task.done():
            raise BatcherError(f"not serving: {self.not_ready()}")
        if len(self._pending) >= self.max_queue:
            raise BatcherError(f"the queue is full ({self.max_queue} requests waiting); retry later")
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Item(batch, future))
        self._arrived.set()
        try:
            return await asyncio.wait_for(future, self.wait_s)  # on timeout the future is cancelled: skipped
        except asyncio.TimeoutError:
            raise BatcherError(f"no result within {self.wait_s:g} s (the server is overloaded)", 504) from None

    async def _loop(self) -> None:
        while True:
            try:
                self._running = await self._next_batch()
                if self._running:
                    await self._run(self._running)
            except Exception as exc:  # never let one bad batch end the loop
                logger.warning("a batch of %d request(s) failed: %r", len(self._running), exc)
                _fail(self._running, exc)
            # not in a finally: if the loop itself ends, _ended still sees (and fails) the running batch
            self._running, self._running_since = [], None

    async def _next_batch(self) -> list[_Item]:
        loop = asyncio.get_running_loop()
        while not self._drop_abandoned():
            self._arrived.clear()
            await self._arrived.wait()
        key = self._pending[0].key
        deadline = loop.time() + self.timeout
        while self._samples(key) < self.max_batch and (remaining := deadline - loop.time()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                break
        return self._take(key)

    def _drop_abandoned(self) -> bool:
        """Forget requests whose caller gave up; True if any are left."""
        if any(item.future.done() for item in self._pending):
            self._pending = deque(item for item in self._pending if not item.future.done())
        return bool(self._pending)

    def _samples(self, key: tuple) -> int:
        return sum(len(item.batch) for item in self._pending if item.key == key and not item.future.done())

    def _take(self, key: tuple) -> list[_Item]:
        """The oldest requests of this shape up to max_batch samples (a larger single request runs alone)."""
        chosen, rest, size = [], deque(), 0
        for item in self._pending:
            if item.future.done():
                continue
            if item.key == key and (not chosen or size + len(item.batch) <= self.max_batch):
                chosen.append(item)
                size += len(item.batch)
            else:
                rest.append(item)
        self._pending = rest
        return chosen

    async def _run(self, items: list[_Item]) -> None:
        joined = np.concatenate([i.batch for i in items]) if len(items) > 1 else items[0].batch
        if self.on_batch:
            self.on_batch(len(joined))
        self._running_since = asyncio.get_running_loop().time()
        output = await self._worker.run(self.run, joined)
        arrays = output.values() if isinstance(output, dict) else [output]  # a runner's infer() or run()
        rows = {len(a) for a in arrays}
        if rows != {len(joined)}:
            raise RuntimeError(f"the runner answered {sorted(rows)} rows for a batch of {len(joined)}")
        start = 0
        for item in items:
            end = start + len(item.batch)
            if not item.future.done():
                item.future.set_result({k: v[start:end] for k, v in output.items()} if isinstance(output, dict)
                                       else output[start:end])
            start = end

    def _ended(self, task: asyncio.Task) -> None:
        if not self._stopped:
            error = task.exception() if not task.cancelled() else None
            self._stopped = f"the batch loop stopped ({error!r})" if error else "the batch loop was cancelled"
            logger.error("%s; every request is now refused with 503", self._stopped)
        failure = BatcherError(f"not serving: {self._stopped}")
        _fail(self._running, failure)
        _fail(self._pending, failure)
        self._pending.clear()


def _fail(items, exc: BaseException) -> None:
    for item in items:
        if not item.future.done():
            item.future.set_exception(exc)
