"""A bounded cache of vision-encoder outputs, kept with the loaded checkpoint for every cell that runs on it.

Video decoding and the vision encoder do not depend on the language-side stages, so when one
process runs several methods over the same videos (a sweep's cells for one model and frame
count) the encoded video is reused. Entries are keyed by video file (path, size, mtime), frame
count and the encoder signals captured with it, held on the model's device, and evicted
least-recently-used beyond `capacity_bytes`. It pays off when the videos of a task fit in the
bound (fixtures, `limit=N`, nightly subsets); for a full benchmark raise the bound or expect misses.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only annotated here: a cell answered from the store imports no model code
    from dycoke_eval.models.base import EncodedVideo


@dataclass
class CachedEncoding:
    encoded: EncodedVideo
    seconds: float  # decode + preprocess + encoder time it cost to make


@dataclass
class EncoderPasses:
    """A run's vision-encoder work: the passes it ran, the answers given from them, and the passes the cache spared."""

    done: int = 0
    answers: int = 0
    cache_hits: int = 0
    cache_seconds: float = 0.0  # what the hits' encodings had cost to make

    @property
    def saved(self) -> int:
        """Passes that cell-major runs would have added: an answer from a shared pass or the encoder cache costs none."""
        return self.answers - self.done


class EncoderCache:
    def __init__(self, capacity_mb: float = 2048) -> None:
        self.capacity_bytes = int(capacity_mb * 2**20)
        self._entries: OrderedDict[tuple, CachedEncoding] = OrderedDict()
        self._bytes = 0

    @staticmethod
    def key(video_path: str, frames: int, signals: frozenset[str]) -> tuple:
        stat = os.stat(video_path)
        return (os.path.abspath(video_path), stat.st_size, stat.st_mtime_ns, frames, tuple(sorted(signals)))

    def __contains__(self, key: tuple) -> bool:
        """Whether the entry is held (the prefetcher plans with it)."""
        return key in self._entries

    def get(self, key: tuple) -> CachedEncoding | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: tuple, entry: CachedEncoding) -> None:
        size = entry.encoded.nbytes()
        if size > self.capacity_bytes:
            return
        self._entries[key] = entry
        self._bytes += size
        while self._bytes > self.capacity_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.encoded.nbytes()
