"""A background thread for slow side work (PNG encoding, file and logger writes) during training.

The standard library has the pieces (``queue.Queue``, ``threading.Thread``) but not this contract:
a bounded queue whose producer *blocks* when full (memory stays bounded and no job is dropped),
jobs run in submission order, and a failing job does not kill the worker but has its exception
re-raised in the caller's thread at the next :meth:`AsyncWriter.drain`.
``concurrent.futures.ThreadPoolExecutor`` queues without bound and reports errors per future only.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["AsyncWriter"]

_STOP = object()


class AsyncWriter:
    """Run jobs in order on one daemon thread, with at most ``maxsize`` jobs waiting.

    >>> writer = AsyncWriter(maxsize=2)
    >>> done = []
    >>> for i in range(5):
    ...     writer.submit(done.append, i)
    >>> writer.drain()
    >>> done
    [0, 1, 2, 3, 4]
    >>> writer.close()

    The thread starts with the first job. :meth:`drain` waits for every submitted job and raises
    the first exception a job raised since the last drain; :meth:`close` drains, then stops the
    thread. Drain or close before reading what the jobs write.

    Args:
        maxsize: Most jobs waiting at once; :meth:`submit` blocks while the queue is full.
        name: Name of the worker thread (shown in stack dumps and profilers).
    """

    def __init__(self, maxsize: int = 8, name: str = "diffusion-lightning-writer") -> None:
        if not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"maxsize={maxsize!r} must be an int >= 1.")
        self.maxsize = maxsize
        self.name = name
        self._queue: queue.Queue[Any] = queue.Queue(maxsize)
        self._errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (no more jobs are accepted)."""
        return self._closed

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Queue ``fn(*args, **kwargs)``, blocking while ``maxsize`` jobs are already waiting."""
        if self._closed:
            raise RuntimeError(f"AsyncWriter {self.name!r} is closed; it accepts no more jobs.")
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
            self._thread.start()
        self._queue.put((fn, args, kwargs))

    def drain(self) -> None:
        """Wait until every submitted job has run; re-raise the first exception one raised."""
        if self._thread is not None:
            self._queue.join()
        with self._lock:
            errors, self._errors = self._errors, []
        if errors:
            first = errors[0]
            if len(errors) > 1 and hasattr(first, "add_note"):
                first.add_note(f"{len(errors) - 1} more background job(s) failed after this one.")
            raise first

    def close(self) -> None:
        """Drain, then stop the worker thread. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        try:
            self.drain()
        finally:
            if self._thread is not None:
                self._queue.put(_STOP)
                self._thread.join()
                self._thread = None

    def __enter__(self) -> AsyncWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                fn, args, kwargs = item
                fn(*args, **kwargs)
            except BaseException as error:  # noqa: BLE001 - reported to the caller by drain()
                with self._lock:
                    self._errors.append(error)
            finally:
                self._queue.task_done()
