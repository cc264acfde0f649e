"""Qwen2.5-VL's ViT salience, as FastVID's released Qwen2.5-VL code computes it: the adapter's `probe_attention`.

FastVID scores Qwen2.5-VL's merged tokens with a [CLS]-like attention in the ViT's last block (a full-attention
block in the real model: `fullatt_block_indexes` [7, 15, 23, 31] of 32), in `Qwen2_5_VLVisionFlashAttention2.forward`
and the tower's `forward` of LunarShen/FastVID@a40a109, `fastvid_qwen25vl/.../qwenvlutils/modeling_qwen2_5_vl.py`
(MQ:194-203, MQ:583-594; docs/qwen.md, section c):

* q and k of the block's `qkv`, after the vision RoPE (`apply_rotary_pos_emb_vision`: in float32, cast back to
  the states' dtype), heads first;
* the query of a temporal patch is the mean of all its patches' queries, a key the mean of the 4 patches of a 2x2
  merge unit (4 consecutive patches in the tower's window order);
* `softmax(q k^T / sqrt(d))` over the patch's N merged tokens in float32, cast back to the states' dtype, then the
  mean over heads;
* un-permuted from window order to raster order (`argsort(window_index)`, as the merger's output is).

The result is [T, N] for T temporal patches of N merged tokens, each row summing to 1, returned as float32 (in a
bf16 model it holds bf16 values, as the released code's). The released code needed FlashAttention-2 (only that
attention class computed it); here it is recomputed from the block's `qkv` output and the RoPE the block receives,
under any attention implementation (sdpa, eager, flash), by hooks held only inside `captured_scores`: the
tower's output is unchanged, and nothing is patched. It is what `probe_attention` means on every family: a probe
query's attention over each frame's tokens, pooled like them (LLaVA: SigLIP's pooling head; here the probe is the
temporal patch's mean query and the keys are pooled per merged token).

From the same hooks, `attention_received` [T, N] (`mean_received_attention`): FlashVID's score, the attention each
merged token receives in that block, every patch of the temporal patch a query (what the signal means on LLaVA).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

SIGNAL = "probe_attention"
RECEIVED = "attention_received"  # FlashVID's: the attention each merged token receives in the last block
MERGE_UNIT = 4  # patches per merged token (2x2), hard-coded in the released code


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The vision RoPE on [S, H, d] queries and keys, with [S, d] cos and sin: in float32, cast back to their dtype
    (`apply_rotary_pos_emb_vision`, the same in transformers 4.51 and 5.x)."""
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        return torch.cat((-x[..., x.shape[-1] // 2 :], x[..., : x.shape[-1] // 2]), dim=-1)

    def embed(x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return ((x32 * cos) + (rotate_half(x32) * sin)).to(x.dtype)

    return embed(q), embed(k)


def rotated_queries_and_keys(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The block's `qkv` output [S, 3 * C] -> its queries and keys [S, H, d], with the vision RoPE applied as the block
    applies it."""
    q, k, _ = qkv.reshape(qkv.shape[0], 3, num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    return rotary(q, k, cos, sin)


def mean_query_attention(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    grid_thw: tuple[int, int, int],
    num_heads: int,
    window_index: torch.Tensor,
) -> torch.Tensor:
    """[T, N] float32 salience of one video's merged tokens in raster order (module docstring).

    `qkv` [S, 3 * C]: the last block's `qkv` output for the video's S = T * G_h * G_w patches in window order;
    `cos`, `sin` [S, d]: the vision RoPE the block receives (window order); `grid_thw`: (T, G_h, G_w) in patches;
    `window_index` [S / 4]: the tower's window order of the merge units (`get_vision_window_index`).
    """
    temporal, rows, cols = grid_thw
    q, k = rotated_queries_and_keys(qkv, cos, sin, num_heads)
    q, k = q.transpose(0, 1), k.transpose(0, 1)  # [H, S, d]
    head_dim = q.shape[-1]
    query = q.view(num_heads, temporal, rows * cols, head_dim).mean(-2, keepdim=True)  # [H, T, 1, d]
    keys = k.view(num_heads, temporal, rows * cols // MERGE_UNIT, MERGE_UNIT, head_dim).mean(-2)  # [H, T, N, d]
    weights = torch.matmul(query, keys.transpose(-2, -1)) / math.sqrt(head_dim)
    weights = torch.nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = weights.mean(2).mean(0)  # [T, N] in window order
    raster = torch.argsort(window_index.to(weights.device))
    return weights.view(-1)[raster].reshape(temporal, -1).float()


def mean_received_attention(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    grid_thw: tuple[int, int, int],
    num_heads: int,
    window_index: torch.Tensor,
) -> torch.Tensor:
    """[T, N] float32 attention each merged token receives, as FlashVID's released Qwen2.5-VL code scores its tokens
    (Fanziyang-v/FlashVID@1d37422c, `flashvid/modeling_qwen2_5_vl.py:575-584, 257-263`), from the same inputs as
    `mean_query_attention`: per temporal patch, `softmax(q k^T / sqrt(d))` over its patches in float32, cast back to the
    states' dtype, mean over heads then over queries; each merge unit's 4 patches averaged (window order); raster order.

    One temporal patch at a time (the release computes all at once): its [H, P, P] weights are the largest tensor."""
    temporal = grid_thw[0]
    q, k = rotated_queries_and_keys(qkv, cos, sin, num_heads)
    head_dim = q.shape[-1]
    q = q.reshape(temporal, -1, num_heads, head_dim).permute(0, 2, 1, 3)  # [T, H, P, d]
    k = k.reshape(temporal, -1, num_heads, head_dim).permute(0, 2, 1, 3)
    received = []
    for patch_q, patch_k in zip(q, k, strict=True):
        weights = torch.matmul(patch_q, patch_k.transpose(-1, -2)) / head_dim**0.5
        weights = torch.nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(patch_q.dtype)
        received.append(weights.mean(0).mean(0))  # heads, then queries: [P] over the keys
    merged = torch.stack(received).view(temporal, -1, MERGE_UNIT).mean(-1).view(-1)  # [T * N] in window order
    raster = torch.argsort(window_index.to(merged.device))
    return merged[raster].view(temporal, -1).float()


SCORES = {SIGNAL: mean_query_attention, RECEIVED: mean_received_attention}  # signal -> how the last block gives it


def _argument(args: tuple, kwargs: dict[str, Any], name: str, position: int) -> Any:
    return kwargs[name] if name in kwargs else args[position]


@contextmanager
def captured_scores(
    tower: torch.nn.Module, into: dict[str, torch.Tensor], scores: dict[str, Callable[..., torch.Tensor]]
) -> Iterator[None]:
    """Within the block, each forward of the Qwen2.5-VL vision `tower` (one video) puts `into[key]` = `score(...)` [T, N]
    for each of `scores` (`SCORES`' functions), read from the last block's `qkv` output and the RoPE passed to its
    attention. Three hooks, removed on exit: the tower's forward pre-hook (the grid), the attention's (cos, sin) and
    the `qkv` forward hook (the scores)."""
    from transformers.vision_utils import get_vision_window_index

    attention = tower.blocks[-1].attn
    seen: dict[str, Any] = {}

    def grid(_module, args, kwargs):
        grid_thw = _argument(args, kwargs, "grid_thw", 1)
        if grid_thw.shape[0] != 1:
            raise ValueError(f"{', '.join(scores)} is computed for one video per tower call; got {grid_thw.shape[0]} grids")
        seen["grid_thw"] = grid_thw

    def rope(_module, args, kwargs):
        seen["position_embeddings"] = _argument(args, kwargs, "position_embeddings", 2)

    def score(_module, _args, qkv):
        grid_thw = seen["grid_thw"]
        window_index, _ = get_vision_window_index(grid_thw, tower.spatial_merge_size, tower.window_size, tower.patch_size)
        cos, sin = seen["position_embeddings"]
        temporal, rows, cols = (int(n) for n in grid_thw[0].tolist())
        for key, score_of in scores.items():
            into[key] = score_of(qkv, cos, sin, (temporal, rows, cols), attention.num_heads, window_index)

    handles = [
        tower.register_forward_pre_hook(grid, with_kwargs=True),
        attention.register_forward_pre_hook(rope, with_kwargs=True),
        attention.qkv.register_forward_hook(score),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
