"""Dynamic batching: concurrent requests are gathered up to ``max_batch`` samples or until
``timeout_ms`` after the first one arrived, run as one batch on a worker thread, and each caller gets
its own rows back. With ``max_batch`` 1 every request runs alone (batching off)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass
class _Item:
    batch: np.ndarray
    future: asyncio.Future


class DynamicBatcher:
    def __init__(self, run: Callable[[np.ndarray], np.ndarray], max_batch: int = 8, timeout_ms: float = 5.0,
                 on_batch: Callable[[int], None] | None = None) -> None:
        self.run = run
        self.max_batch = max(1, max_batch)
        self.timeout = max(0.0, timeout_ms) / 1000.0
        self.on_batch = on_batch
        self.queue: asyncio.Queue[_Item] = asyncio.Queue()
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass

    async def infer(self, batch: np.ndarray) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Item(batch, future))
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self.queue.get()
            items, size = [first], len(first.batch)
            deadline = loop.time() + self.timeout
            while size < self.max_batch:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
                if size + len(item.batch) > self.max_batch:
                    await self._run(items, loop)  # keep the newcomer for the next batch
                    items, size = [item], len(item.batch)
                    deadline = loop.time() + self.timeout
                    continue
                items.append(item)
                size += len(item.batch)
            await self._run(items, loop)

    async def _run(self, items: list[_Item], loop) -> None:
        joined = np.concatenate([i.batch for i in items]) if len(items) > 1 else items[0].batch
        if self.on_batch:
            self.on_batch(len(joined))
        try:
            output = await loop.run_in_executor(None, self.run, joined)
        except Exception as exc:  # hand the failure to every caller of this batch
            for item in items:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        start = 0
        for item in items:
            end = start + len(item.batch)
            if not item.future.done():
                item.future.set_result(output[start:end])
            start = end
