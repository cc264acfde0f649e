"""Dropping sequence positions from the hidden states from a decoder layer on (FastV-style), merging prefill states
entering a layer (HoliTom's merge M), and capturing outputs.

Forward pre-hooks (`with_kwargs=True`) on the decoder layers >= `first_layer` slice the hidden
states and everything positional that the decoder passes to each layer: the rotary
`position_embeddings` (cos, sin), `position_ids` and a materialised mask. Kept tokens keep their
original positions. During decoding they only narrow a materialised mask (the eager kernel's) to
the keys the pruned layers cached. They are removed on exit.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


def keep_positional(kwargs: dict, keep: torch.Tensor) -> dict:
    """A decoder layer's keyword inputs in prefill, narrowed to the prompt positions `keep`: the rotary
    `position_embeddings` (cos, sin), `position_ids` and a materialised mask. Kept tokens keep their positions."""
    cos, sin = kwargs["position_embeddings"]
    kwargs["position_embeddings"] = (cos.index_select(-2, keep), sin.index_select(-2, keep))
    kwargs["position_ids"] = kwargs["position_ids"].index_select(-1, keep)
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor):
        kwargs["attention_mask"] = mask.index_select(-2, keep).index_select(-1, keep)
    return kwargs


def cached_keys_mask(mask: torch.Tensor, cached: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """A decode step's materialised mask over every prompt key and the generated ones -> over the prompt positions
    `cached` (what the layer cached) and the generated ones."""
    generated = torch.arange(prompt_length, mask.shape[-1], device=mask.device)
    return mask.index_select(-1, torch.cat([cached, generated]))


@contextmanager
def prefill_position_pruning(
    decoder: torch.nn.Module, first_layer: int, present_at: Callable[[int], torch.Tensor | None]
) -> Iterator[None]:
    """Within the block, each layer >= `first_layer` of `decoder` sees only `present_at(layer)` of the prefill sequence.

    `present_at` gives ascending prompt positions (None: all), each layer's a subset of the layer
    before's, so several stages can drop in turn (a layer schedule).
    """

    prompt: dict[str, int] = {}

    def slice_inputs(layer, module, args, kwargs):
        position_ids = kwargs["position_ids"]
        keep, full = present_at(layer), position_ids.shape[-1]
        mask = kwargs.get("attention_mask")
        if keep is None:
            return None
        if full == 1:  # a decode step: a materialised (eager) mask still spans every prompt key
            if not isinstance(mask, torch.Tensor):
                return None
            kwargs["attention_mask"] = cached_keys_mask(mask, keep, prompt["length"])
            return args, kwargs
        prompt["length"] = full
        hidden, before = args[0], present_at(layer - 1)
        if hidden.shape[1] != keep.numel():  # the states still hold positions this layer drops
            hidden = hidden.index_select(1, keep if before is None else torch.searchsorted(before, keep))
        return (hidden, *args[1:]), keep_positional(kwargs, keep)

    handles = [
        layer.register_forward_pre_hook(functools.partial(slice_inputs, index), with_kwargs=True)
        for index, layer in enumerate(decoder.layers)
        if index >= first_layer
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def prefill_state_merging(
    decoder: torch.nn.Module, layers: set[int], merge_at: Callable[[int, torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """Within the block, the prefill hidden states entering each of `layers` of `decoder` are `merge_at(layer, states)`.

    Installed before `prefill_position_pruning`, its hooks run first: they see the states the layer before left.
    """

    def merge_inputs(layer, module, args, kwargs):
        hidden = args[0]
        if hidden.shape[1] == 1:  # a decode step
            return None
        return (merge_at(layer, hidden), *args[1:]), kwargs

    handles = [
        decoder.layers[index].register_forward_pre_hook(functools.partial(merge_inputs, index), with_kwargs=True)
        for index in sorted(layers)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def captured_output(module: torch.nn.Module, into: dict[str, torch.Tensor], key: str) -> Iterator[None]:
    """Within the block, `into[key]` receives `module`'s latest output."""

    def keep(_module, _args, output):
        into[key] = output

    handle = module.register_forward_hook(keep)
    try:
        yield
    finally:
        handle.remove()
