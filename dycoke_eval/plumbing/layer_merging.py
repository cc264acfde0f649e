"""Shrinking the prefill sequence in the middle of decoder layers (FrameFusion), and undoing it afterwards.

A decoder layer (transformers' `Qwen2DecoderLayer`) keeps its attention's residual sum in a local and passes that
same tensor to `post_attention_layernorm`; no extension point reaches between the residual add and the MLP, so
three kinds of hooks carry the shrink, all removed on exit:
* a forward pre-hook on each layer's `post_attention_layernorm` steps the fuser on that residual stream: merges
  are written into it in place (so the layer adds the MLP to the merged states, as the release does), and only
  the kept rows go on to the norm and the MLP;
* a forward hook on each layer's `mlp` scatters its output back to the layer's rows (zeros at the dropped ones),
  so the layer's own residual add gives the kept rows' exact sums and leaves the dropped rows behind;
* a forward pre-hook on each decoder layer drops those rows at its entry, with everything positional the decoder
  passes (rotary cos/sin, position ids, a materialised mask); at layer 0's entry it first steps the fuser on (a
  copy of) the embeddings, as the release merges once before layer 0's attention.

Kept tokens keep their original positions. Each layer caches what its attention saw, in cache layers that report
the prompt's full length (`ShortenedLayer`), so generate's input slicing, decode positions and masks go on as if
nothing were dropped; decode steps only narrow a materialised mask to the keys the layer cached.

`reference=True` drops nothing: the merged states are written into the full-length residual stream, and each
layer's attention masks out the tokens absent there (the masked reference the fast path is tested against).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from transformers.cache_utils import Cache, DynamicLayer

from dycoke_eval.compression.stages import Fuser
from dycoke_eval.plumbing.attention import masked_attention
from dycoke_eval.plumbing.hooks import cached_keys_mask, keep_positional


class ShortenedLayer(DynamicLayer):
    """A `DynamicLayer` whose prefill cached fewer entries than the prompt has tokens: it reports the prompt's length,
    then every new token, while returning only what it holds."""

    def __init__(self, prompt_length: int) -> None:
        super().__init__()
        self.prompt_length = prompt_length
        self.absent = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.absent = self.prompt_length - key_states.shape[-2]
        return super().update(key_states, value_states, *args, **kwargs)

    def get_seq_length(self) -> int:
        return super().get_seq_length() + self.absent


class MidLayerShrinking:
    """One sample's prefill shrunk by `fuser` inside every layer of a decoder, on `kernel` (the model's attention)."""

    def __init__(self, fuser: Fuser, kernel: Callable, prompt_length: int, layers: int, reference: bool = False) -> None:
        self.fuser, self.kernel, self.prompt_length, self.reference = fuser, kernel, prompt_length, reference
        self.present: torch.Tensor | None = None  # prompt positions of the current rows (None: all of them)
        self.seen: list[torch.Tensor | None] = [None] * layers  # positions each layer's attention saw and cached
        self.scores: torch.Tensor | None = None  # the last query's attention, for the fuser's next step
        self.next_rows: torch.Tensor | None = None  # rows of a layer's output that the next layer keeps
        self.mlp_rows: tuple[torch.Tensor, int] | None = None  # rows the MLP computed, and the layer's length

    def cache(self) -> Cache:
        return Cache(layers=[ShortenedLayer(self.prompt_length) for _ in self.seen])

    @contextmanager
    def installed(self, decoder: torch.nn.Module) -> Iterator[None]:
        handles = []
        try:
            for index, layer in enumerate(decoder.layers):
                if not (hasattr(layer, "post_attention_layernorm") and hasattr(layer, "mlp")):
                    raise TypeError(f"{type(layer).__name__} has no post_attention_layernorm and mlp to shrink between")
                handles.append(layer.register_forward_pre_hook(functools.partial(self._enter, index), with_kwargs=True))
                handles.append(layer.post_attention_layernorm.register_forward_pre_hook(self._before_mlp))
                if not self.reference:
                    handles.append(layer.mlp.register_forward_hook(self._after_mlp))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _step(self, hidden: torch.Tensor, attention: torch.Tensor | None) -> torch.Tensor | None:
        """Step the fuser on the present rows of hidden [1, L, D]; the fast path's kept rows (None: all, or reference)."""
        if not self.reference or self.present is None:
            rows = self.fuser.step(hidden[0], attention)
        else:  # the fuser sees the present rows, merged back into the full-length stream
            present = hidden[0].index_select(0, self.present)
            rows = self.fuser.step(present, attention)
            hidden[0].index_copy_(0, self.present, present)
        if rows is not None:
            self.present = rows if self.present is None else self.present[rows]
        return None if self.reference else rows

    def _enter(self, layer: int, module, args, kwargs):
        position_ids, mask = kwargs["position_ids"], kwargs.get("attention_mask")
        if position_ids.shape[-1] == 1:  # a decode step: a materialised mask still spans every prompt key
            cached = self.seen[layer]
            if self.reference or cached is None or not isinstance(mask, torch.Tensor):
                return None
            kwargs["attention_mask"] = cached_keys_mask(mask, cached, self.prompt_length)
            return args, kwargs
        hidden = args[0]
        if layer == 0:  # the release's one merge before attention, on a copy of the embeddings
            self.present, self.scores, self.next_rows = None, None, None
            hidden = hidden.clone()
            self.next_rows = self._step(hidden, None)
        if self.next_rows is not None:
            hidden, self.next_rows = hidden.index_select(1, self.next_rows), None
        keep = self.seen[layer] = self.present
        if keep is not None and not self.reference:
            kwargs = keep_positional(kwargs, keep)
        return (hidden, *args[1:]), kwargs

    def _before_mlp(self, module, args):
        hidden = args[0]  # the layer's residual stream itself
        if hidden.shape[1] == 1:
            return None
        attention, self.scores = self.scores, None
        rows = self._step(hidden, attention)
        if rows is None:
            return None
        self.next_rows, self.mlp_rows = rows, (rows, hidden.shape[1])
        return (hidden.index_select(1, rows),)

    def _after_mlp(self, module, args, output):
        if self.mlp_rows is None:
            return None
        (rows, length), self.mlp_rows = self.mlp_rows, None
        return output.new_zeros(output.shape[0], length, output.shape[2]).index_copy_(1, rows, output)

    def attention(self, module, query, key, value, attention_mask, **kwargs):
        """The routed attention: hands the fuser its scores when it asks; the reference masks the absent keys."""
        present = self.seen[module.layer_idx]
        if query.shape[2] > 1 and self.fuser.wants_attention:
            scored = key if present is None or not self.reference else key.index_select(2, present)
            self.scores = self.fuser.score(query, scored)
        if self.reference and present is not None:
            generated = torch.arange(self.prompt_length, key.shape[2], device=key.device)
            index = torch.cat([present, generated])
            return masked_attention(self.kernel, module, query, key, value, attention_mask, index, **kwargs)
        return self.kernel(module, query, key, value, attention_mask, **kwargs)
