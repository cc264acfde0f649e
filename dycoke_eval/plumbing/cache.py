"""A KV-cache layer that holds pruned entries aside, so attention reads only the kept ones.

transformers' extension point for caches is a `Cache` built from layer objects. `PrunableLayer`
is a `DynamicLayer` whose "hot" keys and values (what `update` returns to attention) are the
kept entries plus every new token, while the pruned entries wait in a "cold" store, optionally
on another device (CPU), until a later re-selection brings them back. It reports the full
sequence length, so masks and positions are unaffected. Keys carry their rotary position
already, and attention over keys does not depend on their order, so the hot store needs none.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer
from transformers.generation import utils as generation_utils

# The generate() argument and output field holding the cache: `cache` since transformers 5.2x, which deprecates
# `past_key_values` (removed in 6); earlier 5.x releases know only `past_key_values`.
GENERATE_CACHE_ARGUMENT = "cache" if "cache" in getattr(generation_utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


def generated_cache(output: Any) -> Any:
    """The cache a `generate(..., return_dict_in_generate=True)` output holds, under either name."""
    return getattr(output, GENERATE_CACHE_ARGUMENT)


class PrunableLayer(DynamicLayer):
    def __init__(self, cold_device: str | torch.device | None = None) -> None:
        super().__init__()
        self.cold_device = cold_device  # None: the same device as the hot store
        self.cold_keys = self.cold_values = None
        self.hot_positions = self.cold_positions = None  # absolute positions, in storage order

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        start = self.get_seq_length()
        new = torch.arange(start, start + key_states.shape[-2], device=key_states.device)
        self.hot_positions = new if self.hot_positions is None else torch.cat([self.hot_positions, new])
        return super().update(key_states, value_states, *args, **kwargs)

    def get_seq_length(self) -> int:
        cold = 0 if self.cold_keys is None else self.cold_keys.shape[-2]
        return super().get_seq_length() + cold

    def cold_bytes(self) -> int:
        return 0 if self.cold_keys is None else 2 * self.cold_keys.numel() * self.cold_keys.element_size()

    def keep_hot(self, positions: torch.Tensor) -> None:
        """Make exactly the cached entries at these absolute positions hot; the rest go (or stay) cold."""
        if not self.is_initialized:
            return
        keys, values, where = self.keys, self.values, self.hot_positions
        if self.cold_keys is not None:
            device = keys.device
            keys = torch.cat([keys, self.cold_keys.to(device)], dim=-2)
            values = torch.cat([values, self.cold_values.to(device)], dim=-2)
            where = torch.cat([where, self.cold_positions.to(device)])
        hot = torch.isin(where, positions.to(where.device))
        self.keys, self.values, self.hot_positions = keys[..., hot, :], values[..., hot, :], where[hot]
        if hot.all():
            self.cold_keys = self.cold_values = self.cold_positions = None
            return
        cold_device = self.cold_device or keys.device
        self.cold_keys = keys[..., ~hot, :].to(cold_device)
        self.cold_values = values[..., ~hot, :].to(cold_device)
        self.cold_positions = where[~hot]


class TrimmedLayer(DynamicLayer):
    """A `DynamicLayer` cut down once to the entries at some positions; the others are gone (their memory freed).

    It reports the full sequence length, so masks and positions are unaffected; the entries it returns
    to attention are the kept ones, then every new token (PruneVid trims the layers it scored through).
    """

    def __init__(self) -> None:
        super().__init__()
        self.dropped = 0

    def get_seq_length(self) -> int:
        return super().get_seq_length() + self.dropped

    def trim(self, positions: torch.Tensor) -> None:
        """Keep only the cached entries at these positions (ascending; the layer holds every position so far)."""
        self.dropped += self.keys.shape[-2] - positions.numel()
        self.keys, self.values = self.keys.index_select(-2, positions), self.values.index_select(-2, positions)
