"""FrameFusion (ICCV'25) inside the LLM: merge same-slot tokens of adjacent frames layer by layer, then prune once.

Released code: thu-nics/FrameFusion@fbec1d2e, `framefusion/main.py` (the arithmetic),
`models/qwen2/modeling_qwen2.py` (where it acts), `models/llava_video/modeling_llava_video.py` (bookkeeping),
`utils.py` (the pruning attention). Every visual token has a *slot*: its place within its frame, each
LLaVA-Video row's newline a slot of its own (rows x (cols + 1) slots). One per-sample state (`FrameFusionState`)
is stepped at layer 0's entry and after every prefill layer's attention residual add, before its MLP:

1. Budget (`pruning_ratio`, main.py:322-343): with the sparsities s_i merged so far, `remain = n * cost -
   sum_i prod_{j<=i} (1 - s_j)`; the sparsity the remaining layers need is `1 - remain / ((n - len) * prod)`,
   0 if that is negative. `mode: official` keeps the release's hard-coded n = 28 layers (LLaVA-Video-7B's and
   LLaVA-OV-7B's depth) on every model; `paper` uses the model's own depth (the same on 28-layer models; on the
   24-layer 0.5B or the 80-layer 72B the official budget is 28 * cost layer-equivalents spread over 24 or 80).
2. Similarity (`slot_similarity`, main.py:181-241): visual tokens ordered by slot, then position; the cosine of
   each with the one before it in that order (the same slot in the previous frame present), written by hand
   without an epsilon and computed in the hidden dtype (main.py:345-349); -2 for a slot's first token.
3. Merge (main.py:104-138): `upper` = the budget's sparsity; candidates = similarity >= `similarity_lower_bound`;
   `above` = candidates / visual tokens present (the newlines count). If `above < upper`, every candidate
   merges, `above` joins the sparsities, and merging ends once `above < ratio_lower_bound` (a prune follows);
   otherwise the `int(upper * visual)` most similar merge and both merging and pruning end.
4. Merge arithmetic (`merge_runs`, main.py:244-319): each run of consecutive candidates in a slot's chain is
   added into the token before the run (its earliest frame) and divided by run length + 1: a uniform mean.
   The merged-away tokens leave the sequence; the survivor keeps its position.
5. Prune (`prune_rows`, main.py:61-101): once merging has ended (without the top-k branch), the next attention
   (the same layer's, when it ended at layer 0's entry) gives the last query's softmax attention, head mean
   (`last_query_attention`, utils.py:27-57), and the visual span keeps `round(V * (1 - ratio))` tokens.

Quirks kept (all modes): the hard-coded 28 layers (official); the hand-written cosine in the hidden dtype (bf16
in the release's examples); the merge sums accumulate in place in the hidden dtype (`index_add_` over a batch
dimension, which on the CPU rounds after every member, then a division; the release notes "may have numerical
instability"), and as the merge writes into the residual stream in place, the merged survivor carries on in the
residual too; the pruning attention in the query dtype, scaled by `1/sqrt(head_dim)` after the product and never
masked (the release builds no mask for its one query row); a `cost` the merges already overspent stops the sample
("The cost is too small", main.py:339-340); merging on into every one of the n layers would divide by zero
(main.py:341), a `ZeroDivisionError` here too. Sums on CUDA: the release's `index_add_` adds with atomics in no
fixed order, so bf16 survivors can differ in the last bit from run to run, here as there. Run lengths: the release
counts them in the hidden dtype (exact for runs of up to 256 frames); here they are integers. The budget counts
step i as layer i (layer i's attention sees the states after step i, layer 0's entry being step 0), so on 28
layers the attention sees `cost` of the visual tokens on average (up to the rounding of the counts), unless
merging runs on to the last layer under budget.

Host reads: the candidate count decides both the branch and the new length, so each merging layer reads it once
(the release reads it with `.item()`); the prune needs none. Layouts: LLaVA-Video's is the release's; LLaVA-OV
has no released bookkeeping (the release's `p * (p + 1)` slots do not match its one newline after the video),
so here it is a port: rows x cols slots per frame, the video's one newline a slot of its own. Qwen2.5-VL and
Qwen3-VL have no released adapter and are refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dycoke_eval.compression.stages import MidLayerStage, ModelInfo, PlannedCounts
from dycoke_eval.config import ConfigError
from dycoke_eval.geometry import LLAVA_FAMILIES, VideoLayout

MODES = ("official", "paper")
RELEASED_LAYERS = 28  # main.py:322, `num_layers = 28`
TEXT = -1  # a text token's slot (main.py:5)
IGNORE = -2.0  # the similarity of a slot's first token, and across slots (main.py:6, 225)


def frame_slots(layout: VideoLayout) -> torch.Tensor:
    """[V] each visual token's slot, in the LLM's visual order: LLaVA-Video's rows x (cols + 1) slots per frame (the
    row newlines included, modeling_llava_video.py:321-335); LLaVA-OV's port: rows x cols, then the one newline."""
    if layout.newlines == "row_end":
        return torch.arange(layout.rows * (layout.cols + 1)).repeat(layout.frames)
    slots = torch.arange(layout.tokens_per_frame).repeat(layout.frames)
    return torch.cat([slots, torch.full((layout.newline_tokens,), layout.tokens_per_frame)])


def slot_count(layout: VideoLayout) -> int:
    return layout.rows * (layout.cols + 1) if layout.newlines == "row_end" else layout.tokens_per_frame + 1


def pruning_ratio(sparsities: Sequence[float], cost: float, layers: int) -> float:
    """The sparsity the layers after `sparsities` need for a total compute of `cost * layers` (main.py:322-343)."""
    done, kept, spent = len(sparsities), 1.0, 0.0
    for sparsity in sparsities:
        kept *= 1 - sparsity
        spent += kept
    remain = layers * cost - spent
    if remain < 0:
        raise ConfigError(
            f"cost={cost}: the merges of the first {done} layers already spent more than the budget (the release "
            "stops with 'The cost is too small'); raise cost"
        )
    if remain / ((layers - done) * kept) > 1:
        return 0
    return 1 - remain / ((layers - done) * kept)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine as released (main.py:345-349): no epsilon, in the inputs' dtype."""
    return torch.sum(a * b, dim=-1) / (torch.norm(a, dim=-1) * torch.norm(b, dim=-1))


def slot_similarity(hidden: torch.Tensor, slots: torch.Tensor, slot_total: int, visual: int) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [L, D], slots [L] (TEXT for text), `visual` tokens with a slot -> (similarity [visual], order [visual]):
    the rows in slot-then-position order and each one's cosine with the row before it there (IGNORE across slots and
    for the first), as main.py:181-241 computes it."""
    key = torch.where(slots == TEXT, slot_total, slots)
    order = torch.sort(key, stable=True).indices[:visual]
    ordered = key[order]
    similarity = cosine(hidden[order[:-1]], hidden[order[1:]])
    similarity = similarity.masked_fill(ordered[:-1] != ordered[1:], IGNORE)
    first = torch.full((1,), IGNORE, dtype=hidden.dtype, device=hidden.device)
    return torch.cat([first, similarity]), order


def merge_runs(hidden: torch.Tensor, order: torch.Tensor, merged: torch.Tensor) -> torch.Tensor:
    """Merge, in place, each run of `merged` (ascending indices into `order`) into the token before the run: its sum
    then divided by the run's length + 1 (main.py:244-319) -> the kept rows of `hidden` [L, D], ascending.

    Every other token of `order` is divided by 1 (exact), so finding the survivors needs no host read."""
    visual, device = order.numel(), hidden.device
    is_merged = torch.zeros(visual, dtype=torch.bool, device=device).index_fill_(0, merged, True)
    positions = torch.arange(visual, device=device)
    into = torch.where(is_merged, 0, positions).cummax(0).values[merged]  # the last unmerged token before each
    # On the batch dimension's view, as released: there the CPU adds a run's members one by one in the hidden dtype
    # (on dim 0 of [L, D] it sums them in float32 first, which rounds otherwise).
    hidden.unsqueeze(0).index_add_(1, order[into], hidden[order[merged]].unsqueeze(0))
    counts = torch.zeros(visual, dtype=torch.long, device=device).index_add_(0, into, torch.ones_like(into))
    hidden.index_copy_(0, order, hidden[order] / (counts[:, None] + 1))
    rows = torch.arange(hidden.shape[0], device=device)
    gone = torch.zeros_like(rows, dtype=torch.bool).index_fill_(0, order[merged], True)
    return torch.where(gone, rows.numel(), rows).sort().values[: rows.numel() - merged.numel()]  # no host read


def prune_rows(attention: torch.Tensor, start: int, visual: int, ratio: float) -> torch.Tensor:
    """attention [L] over the sequence -> the rows kept: every text row and the `round(visual * (1 - ratio))` most
    attended of the visual span [start, start + visual) (main.py:61-101), ascending."""
    top = attention[start : start + visual].topk(round(visual * (1 - ratio))).indices + start
    device = attention.device
    rows = torch.cat([torch.arange(start, device=device), top, torch.arange(start + visual, attention.numel(), device=device)])
    return rows.sort().values


def last_query_attention(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """query [1, H, L, d], key [1, Hkv, T, d] -> [T]: the last query's softmax attention in the query dtype, scaled
    after the product, unmasked, averaged over heads (utils.py:27-57, main.py:70)."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)  # transformers' repeat_kv order: each key head serves `groups` heads
    weights = query[:, :, -1:, :] @ key.transpose(-2, -1) * (1 / math.sqrt(query.size(-1)))
    return torch.mean(torch.softmax(weights, dim=-1), dim=(1, 2))[0]


@dataclass
class FrameFusionState:
    """One sample's walk through the release's `FrameFusion.forward` (main.py:40-140) over the current sequence."""

    stage: FrameFusion
    slots: torch.Tensor  # [L] the current sequence's slots (TEXT for text)
    slot_total: int
    start: int  # the first visual row (text before the video is never removed)
    visual: int  # visual rows present
    layers: int  # the budget's n
    sparsities: list[float] = field(default_factory=list)
    merging: bool = True
    pruning: bool = True
    merge_steps: int = 0
    pruned_ratio: float | None = None

    @property
    def wants_attention(self) -> bool:
        """Whether the next attention must hand its last query's attention over (utils.py via modeling_qwen2.py:168)."""
        return self.pruning and not self.merging

    def score(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        return last_query_attention(query, key)

    def step(self, hidden: torch.Tensor, attention: torch.Tensor | None = None) -> torch.Tensor | None:
        """hidden [L, D] of a prefill pass (merged in place) -> the rows that go on (None: all)."""
        self.slots = self.slots.to(hidden.device)  # built on the host before the model ran; a no-op once moved
        if self.wants_attention:
            if attention is None:
                raise RuntimeError("framefusion: the pruning step needs the attention its layer computed")
            ratio = pruning_ratio(self.sparsities, self.stage.cost, self.layers)
            rows = prune_rows(attention, self.start, self.visual, ratio)
            self.pruning, self.pruned_ratio = False, ratio
        elif self.merging:
            rows = self._merge(hidden)
        else:
            return None
        if rows is not None:
            self.slots = self.slots[rows]
            self.visual -= hidden.shape[0] - rows.numel()
        return rows

    def _merge(self, hidden: torch.Tensor) -> torch.Tensor | None:
        upper = pruning_ratio(self.sparsities, self.stage.cost, self.layers)
        similarity, order = slot_similarity(hidden, self.slots, self.slot_total, self.visual)
        merged = torch.where(similarity >= self.stage.similarity_lower_bound)[0]
        above = merged.numel() / self.visual  # the host read
        if above < upper:
            self.sparsities.append(above)
            self.merging = above >= self.stage.ratio_lower_bound
        else:
            merged = torch.topk(similarity, int(upper * self.visual)).indices.sort().values
            self.merging = self.pruning = False
        self.merge_steps += 1
        return merge_runs(hidden, order, merged) if merged.numel() else None

    def figures(self) -> dict[str, Any]:
        return {
            "framefusion_merge_steps": self.merge_steps,  # layer 0's entry counts as one
            "framefusion_sparsities": [round(s, 6) for s in self.sparsities],
            "framefusion_prune_ratio": self.pruned_ratio,
        }


@dataclass
class FrameFusion(MidLayerStage):
    cost: float = 0.3  # the share of the full vision-token compute over the layers (main.py:9)
    similarity_lower_bound: float = 0.6  # S_th: cosine at or above which a token merges into its slot's predecessor
    ratio_lower_bound: float = 0.1  # merging ends after a layer that merged less than this share
    mode: str = "official"  # official: the budget counts 28 layers on every model; paper: the model's own depth
    name: str = "framefusion"

    def __post_init__(self) -> None:
        if not 0 < self.cost <= 1:
            raise ConfigError(f"cost={self.cost}: FrameFusion's cost is a share of the full compute, in (0, 1]")
        if not -1 <= self.similarity_lower_bound <= 1:
            raise ConfigError(f"similarity_lower_bound={self.similarity_lower_bound}: a cosine bound, in [-1, 1]")
        if not 0 <= self.ratio_lower_bound <= 1:
            raise ConfigError(f"ratio_lower_bound={self.ratio_lower_bound}: a share of the visual tokens, in [0, 1]")
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r}: use one of {', '.join(MODES)}")

    def check(self, model: ModelInfo) -> None:
        if model.family not in LLAVA_FAMILIES:
            raise ConfigError(
                f"{self.name}: the {model.family!r} model family has no released FrameFusion adapter (LLaVA-Video's "
                "layout only, ported here to LLaVA-OV); choose fastv or dycoke"
            )

    def budget_layers(self, layers: int) -> int:
        return RELEASED_LAYERS if self.mode == "official" else layers

    def new_fuser(self, layout: VideoLayout, visual_start: int, prompt_length: int, layers: int) -> FrameFusionState:
        slots = frame_slots(layout)
        text_before = torch.full((visual_start,), TEXT)
        text_after = torch.full((prompt_length - visual_start - slots.numel(),), TEXT)
        return FrameFusionState(
            self,
            torch.cat([text_before, slots, text_after]),
            slot_count(layout),
            visual_start,
            slots.numel(),
            self.budget_layers(layers),
        )

    def plan(self, counts: PlannedCounts) -> PlannedCounts:
        """Nominal (the merges follow the video): layer 0 receives every token and each later layer the same share,
        the budget's n-layer schedule spending `cost` (n = 28 in official mode, so on another depth the mean over the
        model's layers is not `cost`); each layer decodes over what it cached."""
        layers, budget, full = len(counts.prefill), self.budget_layers(len(counts.prefill)), counts.prefill[0]
        rest = min(full, max(0.0, full * (self.cost * budget - 1) / (budget - 1))) if budget > 1 else full
        per_layer = [full] + [rest] * (layers - 1)
        return counts.with_layers(per_layer, per_layer)
