"""One generation on a worker thread, its chunks read as they come: `Job(work, lock).events()`.

`work(on_chunk)` runs on its own thread while holding `lock` (the server's one lock: two
generations never share the loaded model at once, whatever queue the request came through);
each `on_chunk(x)` call and then the return value come out of `events()` in order, and an
exception of the work is raised there. Closing the reader (the page went away, the request was
cancelled) stops the work at its next chunk; the lock is held until the work has returned.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator


class Cancelled(Exception):
  """Raised inside the work when nobody reads its chunks any more."""


_CHUNK, _DONE, _FAILED = "chunk", "done", "failed"


class Job:
  def __init__(self, work: Callable[[Callable], object], lock: threading.Lock):
    self._work, self._lock = work, lock
    self._queue: queue.Queue = queue.Queue()
    self._cancelled = threading.Event()
    self._thread = threading.Thread(target=self._run, name="magi-serve-job", daemon=True)

  def _on_chunk(self, chunk) -> None:
    if self._cancelled.is_set():
      raise Cancelled("the request was cancelled")
    self._queue.put((_CHUNK, chunk))

  def _run(self) -> None:
    try:
      with self._lock:
        if self._cancelled.is_set():
          raise Cancelled("the request was cancelled")
        result = self._work(self._on_chunk)
    except BaseException as e:       # noqa: BLE001 - handed to the reader, raised there
      self._queue.put((_FAILED, e))
    else:
      self._queue.put((_DONE, result))

  def events(self) -> Iterator:
    """Each chunk, then the work's result (the last item); raises the work's exception."""
    self._thread.start()
    try:
      while True:
        kind, value = self._queue.get()
        if kind == _FAILED:
          raise value
        yield value
        if kind == _DONE:
          return
    finally:
      self._cancelled.set()

  def cancel(self) -> None:
    self._cancelled.set()

  def join(self, timeout: float | None = None) -> None:
    self._thread.join(timeout)
