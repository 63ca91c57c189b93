"""Reward calls that can never hold the trainer: a worker that does not keep the process alive, and a
deadline for rewards that run in this process (the Python API's callables and Reward objects).

A function that never returns cannot be killed from Python; it can only be left behind. Both pieces
therefore run the call on a daemon thread: the caller stops waiting at the deadline (the samples count
as failed, NaN), and the process can still exit at once, since daemon threads are not joined at exit
(concurrent.futures' pool threads are, which made one hung reward call hang the exit too).
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import queue
import threading

from .base import logger


class DaemonWorker:
    """One daemon thread running submitted calls in order (batches stay ordered, engines single-threaded)."""

    def __init__(self, name: str = "rewards"):
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            future, fn, args = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(exc)

    def submit(self, fn, *args) -> cf.Future:
        future: cf.Future = cf.Future()
        self._jobs.put((future, fn, args))
        return future

    def shutdown(self, wait_s: float = 0.0) -> None:
        """Pending calls are cancelled; a running one is waited for at most `wait_s`, then left behind."""
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job[0].cancel()
        self._jobs.put(None)
        if wait_s > 0:
            self._thread.join(wait_s)


class Deadline:
    """Runs one reward's `score` with a time limit. A call past the limit is left running on its daemon
    thread and its samples are NaN (failed); while it still runs, later calls fail at once rather than
    pile up threads on a reward that hangs (its object may not be thread-safe either)."""

    def __init__(self, name: str, timeout_s: float):
        self.name, self.timeout_s = name, float(timeout_s)
        self._hung: threading.Thread | None = None

    def __call__(self, fn, samples: list) -> list[float]:
        n = len(samples)
        if self._hung is not None and self._hung.is_alive():
            logger.warning("reward %s: its call cut at --reward_timeout_s is still running; %d samples -> NaN",
                           self.name, n)
            return [math.nan] * n
        self._hung = None
        box: dict = {}

        def call():
            try:
                box["value"] = fn(samples)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                box["error"] = exc

        thread = threading.Thread(target=call, name=f"reward-{self.name}", daemon=True)
        thread.start()
        thread.join(self.timeout_s)
        if thread.is_alive():
            self._hung = thread
            logger.warning("reward %s did not return within %g s (--reward_timeout_s): its %d samples count as "
                           "failed (NaN); the call is left running", self.name, self.timeout_s, n)
            return [math.nan] * n
        if "error" in box:
            raise box["error"]
        return box["value"]


def map_daemon(fn, items: list, concurrency: int) -> list:
    """[fn(i, item) ...] in order, on at most `concurrency` daemon threads (a pool's threads would be joined
    at exit, so a call hung on the network would hold the process); the first exception is re-raised."""
    results: list = [None] * len(items)
    errors: list[BaseException] = []
    todo: queue.Queue = queue.Queue()
    for k in range(len(items)):
        todo.put(k)

    def work():
        while True:
            try:
                k = todo.get_nowait()
            except queue.Empty:
                return
            try:
                results[k] = fn(k, items[k])
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(exc)

    threads = [threading.Thread(target=work, name="reward-chunk", daemon=True)
               for _ in range(max(1, min(concurrency, len(items))))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
