"""Decoding ahead of training in a background thread of the training process (`data.num_workers=0`).

Reading a tar shard and decoding its PNGs costs ~1 ms per batch of 64 digits and ~5 ms per batch of
128 CIFAR-10 images. `prefetch(batches, depth)` runs the pipeline in one thread, up to `depth` batches
ahead of the consumer, without the start-up, pickling and memory of worker processes. It pays when the
training step releases the GIL for most of its time (long convolutions and matmuls: zlib, file reads
and those kernels then run side by side); a small, Python-bound step instead competes with the thread
for the GIL and gets slower, which is why `data.prefetch` defaults to 0 (docs/data.md).

What a prefetching loader hands out is unchanged: the same batches in the same order, exceptions
(`data.on_bad_sample=raise`) raised in the consumer at the batch where they occurred, and
`BadSampleWarning`s emitted in the consumer's thread (where `warnings` filters and `pytest.warns`
look) when it receives the next batch. Batches decoded ahead and not consumed are simply dropped:
the loader's saved position counts batches consumed, never batches decoded.
"""

from __future__ import annotations

import queue
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

_local = threading.local()  # .sink: a list collecting the warnings of a prefetch thread


def warn(message: str, category: type[Warning]) -> None:
    """`warnings.warn`, or deferred to the consumer when called from a prefetch thread."""
    sink = getattr(_local, "sink", None)
    if sink is None:
        warnings.warn(message, category, stacklevel=3)
    else:
        sink.append((message, category))


def prefetch(items: Iterable[Any], depth: int, transform: Callable[[Any], Any] | None = None) -> Iterator[Any]:
    """The items of `items`, produced by a background thread up to `depth` ahead (`transform`, e.g.
    pinning memory, is applied in that thread). Closing the returned generator (or dropping it) stops
    the thread at its next item; `iter(items)` is called here, in the caller's thread."""
    it = iter(items)
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(entry: tuple) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        _local.sink = []
        try:
            for item in it:
                if transform is not None:
                    item = transform(item)
                entry, _local.sink = ("item", item, _local.sink), []
                if not put(entry):
                    return
            put(("end", None, _local.sink))
        except BaseException as err:  # handed to the consumer, raised there in order
            put(("error", err, _local.sink))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()  # shard files opened by the pipeline's generators

    thread = threading.Thread(target=produce, name="scalegen-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, item, deferred = q.get()
            for message, category in deferred:
                warnings.warn(message, category, stacklevel=2)
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
