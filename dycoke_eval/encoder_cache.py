"""A bounded in-process cache of vision-encoder outputs, shared by every cell of a sweep process.

Video decoding and the vision encoder do not depend on the language-side stages, so when one
process runs several methods over the same videos (a sweep's cells for one model and frame
count) the encoded video is reused. Entries are keyed by checkpoint (with dtype and random-weights
mode), video file (path, size, mtime), frame count and the encoder signals captured with it, held
on the model's device, and evicted least-recently-used beyond `capacity_bytes`. It pays off when
the videos of a task fit in the bound (fixtures, `limit=N`, nightly subsets); for a full benchmark
raise the bound or expect misses. Each hit records the seconds it saved.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

from dycoke_eval.models.base import EncodedVideo


@dataclass
class CachedEncoding:
    encoded: EncodedVideo
    seconds: float  # decode + preprocess + encoder time it cost to make


class EncoderCache:
    def __init__(self, capacity_mb: float = 2048) -> None:
        self.capacity_bytes = int(capacity_mb * 2**20)
        self._entries: OrderedDict[tuple, CachedEncoding] = OrderedDict()
        self._bytes = 0
        self.hits = self.misses = 0
        self.seconds_saved = 0.0

    @staticmethod
    def key(checkpoint: tuple, video_path: str, frames: int, signals: frozenset[str]) -> tuple:
        stat = os.stat(video_path)
        return (checkpoint, os.path.abspath(video_path), stat.st_size, stat.st_mtime_ns, frames, tuple(sorted(signals)))

    def __contains__(self, key: tuple) -> bool:
        """Whether the entry is held, without counting a hit or a miss (the prefetcher plans with it)."""
        return key in self._entries

    def get(self, key: tuple) -> CachedEncoding | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        self.seconds_saved += entry.seconds
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


ENCODER_CACHE = EncoderCache()  # one per process, like the loaded checkpoint
