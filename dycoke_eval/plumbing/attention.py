"""Routing a language model's attention through a custom function, and undoing it afterwards.

transformers' extension point is `AttentionInterface.register(name, fn)` plus setting the
model's attention implementation to `name`. The mask must be registered under the same name
(`AttentionMaskInterface`), otherwise it silently becomes None. Both registrations and the
implementation switch are undone on exit, so one loaded model can run several methods in turn.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask


def language_model(model) -> torch.nn.Module:
    """The decoder stack of a LLaVA-OneVision model."""
    return model.model.language_model


def vision_tower(model) -> torch.nn.Module:
    """The SigLIP encoder of a LLaVA-OneVision model."""
    return model.model.vision_tower


@contextmanager
def routed_attention(module, name: str, attention_fn: Callable) -> Iterator[None]:
    """Within the block, every attention layer of `module` (a PreTrainedModel) calls `attention_fn`."""
    previous = module.config._attn_implementation
    AttentionInterface.register(name, attention_fn)
    AttentionMaskInterface.register(name, sdpa_mask)
    try:
        module.set_attn_implementation(name)
        yield
    finally:
        module.set_attn_implementation(previous)
        del AttentionInterface._global_mapping[name]
        del AttentionMaskInterface._global_mapping[name]


def subset_sdpa(module, query, key, value, attention_mask, index: torch.Tensor, **kwargs):
    """SDPA over the keys at `index` only: the pruned computation (a gather, then a shorter attention)."""
    key, value = key.index_select(2, index), value.index_select(2, index)
    if attention_mask is not None:
        attention_mask = attention_mask.index_select(-1, index)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def masked_sdpa(module, query, key, value, attention_mask, index: torch.Tensor, **kwargs):
    """Reference for `subset_sdpa`: full-length SDPA with every key outside `index` masked out."""
    queries, keys = query.shape[2], key.shape[2]
    allowed = torch.zeros(keys, dtype=torch.bool, device=key.device)
    allowed[index] = True
    causal = torch.ones(queries, keys, dtype=torch.bool, device=key.device).tril(keys - queries)
    mask = (allowed & causal)[None, None]
    if attention_mask is not None:
        mask = mask & (attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0)
    return sdpa_attention_forward(module, query, key, value, mask, **kwargs)
