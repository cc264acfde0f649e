"""Routing a model's attention through a custom function, and undoing it afterwards.

transformers' extension point is `AttentionInterface.register(name, fn)` plus setting the
model's attention implementation to `name`. The mask must be registered under the same name
(`AttentionMaskInterface`), otherwise it silently becomes None. Both registrations and the
implementation switch are undone on exit, so one loaded model can run several methods in turn.

A routed function computes with the kernel the model was loaded with (`attn_implementation`):
`attention_kernel(module)` returns it, and the mask registered for the route is that kernel's
mask, so `sdpa` and `eager` runs of a method differ only in the kernel, as they do without one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from dycoke_eval.config import check_routable


def kernel_name(module) -> str:
    """The attention implementation `module` (a PreTrainedModel) was loaded with."""
    return module.config._attn_implementation


def attention_kernel(module) -> Callable:
    """The attention function of the kernel `module` was loaded with: SDPA, or the model family's own eager function."""
    name = kernel_name(module)
    check_routable(name, type(module).__name__)
    if name == "sdpa":
        return sdpa_attention_forward
    return sys.modules[type(module).__module__].eager_attention_forward


@contextmanager
def routed_attention(module, name: str, attention_fn: Callable) -> Iterator[None]:
    """Within the block, every attention layer of `module` (a PreTrainedModel) calls `attention_fn`."""
    previous = kernel_name(module)
    AttentionInterface.register(name, attention_fn)
    AttentionMaskInterface.register(name, AttentionMaskInterface._global_mapping[previous])
    try:
        module.set_attn_implementation(name)
        yield
    finally:
        module.set_attn_implementation(previous)
        del AttentionInterface._global_mapping[name]
        del AttentionMaskInterface._global_mapping[name]


def subset_attention(kernel: Callable, module, query, key, value, attention_mask, index: torch.Tensor, **kwargs):
    """Attention over the keys at `index` only: the pruned computation (a gather, then a shorter attention)."""
    key, value = key.index_select(2, index), value.index_select(2, index)
    if attention_mask is not None:
        attention_mask = attention_mask.index_select(-1, index)
    return kernel(module, query, key, value, attention_mask, **kwargs)


def masked_attention(kernel: Callable, module, query, key, value, attention_mask, index: torch.Tensor, **kwargs):
    """Reference for `subset_attention`: full-length attention with every key outside `index` masked out."""
    queries, keys = query.shape[2], key.shape[2]
    allowed = torch.zeros(keys, dtype=torch.bool, device=key.device)
    allowed[index] = True
    causal = torch.ones(queries, keys, dtype=torch.bool, device=key.device).tril(keys - queries)
    mask = (allowed & causal)[None, None]
    if attention_mask is not None:
        mask = mask & (attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0)
    if kernel is not sdpa_attention_forward:  # eager kernels add the mask to the scores
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(~mask, torch.finfo(query.dtype).min)
    return kernel(module, query, key, value, mask, **kwargs)
