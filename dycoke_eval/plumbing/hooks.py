"""Dropping sequence positions from the hidden states from one decoder layer on (FastV-style).

Forward pre-hooks (`with_kwargs=True`) on the decoder layers >= `first_layer` slice the hidden
states and everything positional that the decoder passes to each layer: the rotary
`position_embeddings` (cos, sin), `position_ids` and a materialised mask. Kept tokens keep their
original positions. During decoding they only narrow a materialised mask (the eager kernel's) to
the keys the pruned layers cached. They are removed on exit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from dycoke_eval.plumbing.attention import language_model


@contextmanager
def prefill_position_pruning(model, first_layer: int, kept_positions: Callable[[], torch.Tensor | None]) -> Iterator[None]:
    """Within the block, layers >= `first_layer` see only `kept_positions()` of the prefill sequence."""

    prompt: dict[str, int] = {}

    def slice_inputs(module, args, kwargs):
        keep, position_ids = kept_positions(), kwargs["position_ids"]
        full = position_ids.shape[-1]
        mask = kwargs.get("attention_mask")
        if keep is None:
            return None
        if full == 1:  # a decode step: a materialised (eager) mask still spans every prompt key
            if not isinstance(mask, torch.Tensor):
                return None
            generated = torch.arange(prompt["length"], mask.shape[-1], device=keep.device)
            kwargs["attention_mask"] = mask.index_select(-1, torch.cat([keep, generated]))
            return args, kwargs
        prompt["length"] = full
        hidden = args[0]
        if hidden.shape[1] == full:  # the first pruned layer; later ones already get the short sequence
            hidden = hidden.index_select(1, keep)
        cos, sin = kwargs["position_embeddings"]
        kwargs["position_embeddings"] = (cos.index_select(-2, keep), sin.index_select(-2, keep))
        kwargs["position_ids"] = position_ids.index_select(-1, keep)
        if isinstance(mask, torch.Tensor):
            kwargs["attention_mask"] = mask.index_select(-2, keep).index_select(-1, keep)
        return (hidden, *args[1:]), kwargs

    layers = language_model(model).layers[first_layer:]
    handles = [layer.register_forward_pre_hook(slice_inputs, with_kwargs=True) for layer in layers]
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
