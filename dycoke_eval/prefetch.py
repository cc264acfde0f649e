"""A bounded prefetcher: the next few work items load in background threads while the caller takes them in order.

The wrapper decodes (and preprocesses) the next samples' videos this way while the model computes
the current one. At most `depth` items load, or wait loaded, beyond the one the caller took last:
a loaded item (decoded frames, pixel tensors) is large. Each item comes with its `Future`; a load's
exception belongs to that item alone and is raised by its `result()`, while the later items load
on. Leaving the `with` block, done, stopped early or raising, cancels the loads not started and
joins the threads. PyAV and torch release the GIL while they work, so the threads overlap with
the caller's compute.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

Item = TypeVar("Item")
Loaded = TypeVar("Loaded")


class Prefetcher(Generic[Item, Loaded]):
    """`with Prefetcher(items, load, depth, workers) as ahead: for item, future in ahead: future.result() ...`"""

    def __init__(self, items: Iterable[Item], load: Callable[[Item], Loaded], depth: int = 2, workers: int = 1) -> None:
        if depth < 1 or workers < 1:
            raise ValueError(f"depth={depth}, workers={workers}: both must be at least 1")
        self._items = iter(items)
        self._load = load
        self._depth = depth
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="prefetch")  # threads start with the first load
        self._ahead: deque[tuple[Item, Future[Loaded]]] = deque()

    def __enter__(self) -> Prefetcher[Item, Loaded]:
        self._top_up()
        return self

    def __exit__(self, *exc_info) -> None:
        for _, future in self._ahead:
            future.cancel()  # loads not started never start; running ones finish, unread
        self._ahead.clear()
        self._pool.shutdown(wait=True)

    def __iter__(self) -> Iterator[tuple[Item, Future[Loaded]]]:
        return self

    def __next__(self) -> tuple[Item, Future[Loaded]]:
        """The next item in order with its load's future; the item `depth` further on starts loading."""
        if not self._ahead:
            raise StopIteration
        taken = self._ahead.popleft()
        self._top_up()
        return taken

    def _top_up(self) -> None:
        while len(self._ahead) < self._depth:
            item = next(self._items, _END)
            if item is _END:
                return
            self._ahead.append((item, self._pool.submit(self._load, item)))


_END = object()
