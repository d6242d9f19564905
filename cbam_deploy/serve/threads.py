"""A fixed pool of daemon threads for the server's blocking work (image decoding, JSON parsing,
inference), so the event loop only ever moves bytes.

Why not ``concurrent.futures.ThreadPoolExecutor``: the interpreter joins its workers at exit, so an
inference still running when SIGTERM arrives would hold the process up for as long as it takes.
Daemon threads never do; the server stops on time and the abandoned result is dropped.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any


class DaemonThreads:
    def __init__(self, workers: int, name: str) -> None:
        self.workers = max(1, workers)
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        for index in range(self.workers):
            threading.Thread(target=self._work, name=f"{name}-{index}", daemon=True).start()

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on a worker; its exception is raised here. Cancelling the caller drops the result."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._jobs.put((loop, future, fn, args))
        return await future

    def close(self) -> None:
        """Let the workers finish their current job and end (queued jobs still run first)."""
        for _ in range(self.workers):
            self._jobs.put(None)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, future, fn, args = job
            if future.cancelled():  # the caller gave up before the job started
                continue
            try:
                result, error = fn(*args), None
            except Exception as exc:
                result, error = None, exc
            except BaseException as exc:  # SystemExit and the like from a job: not the worker's end
                result, error = None, RuntimeError(f"worker job raised {exc!r}")
            try:
                loop.call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:  # the event loop is closed: nobody is waiting any more
                pass


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
