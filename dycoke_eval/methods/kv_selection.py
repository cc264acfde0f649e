"""DyCoke stage 2, dynamic KV-cache pruning: which cached visual tokens a decode step attends to.

Pure tensor functions plus a small state machine; the plumbing that applies the choice inside
the attention layers lives in `dycoke_eval.plumbing.attention`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def last_query_attention(query: torch.Tensor, key: torch.Tensor, scaling: float, mask: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention of the last query over all keys, averaged over heads: [kv_len].

    query [1, Hq, Q, d], key [1, Hkv, T, d] (grouped-query heads share keys), mask broadcastable
    to [1, 1, Q, T], boolean (True = attend) or additive.
    """
    heads, kv_heads, dim = query.shape[1], key.shape[1], query.shape[-1]
    q = query[0, :, -1].reshape(kv_heads, heads // kv_heads, dim)
    scores = torch.einsum("hgd,htd->hgt", q.float(), key[0].float()) * scaling
    if mask is not None:
        row = mask[0, 0, -1, -scores.shape[-1] :]
        scores = scores.masked_fill(~row, float("-inf")) if row.dtype == torch.bool else scores + row.float()
    return scores.softmax(dim=-1).mean(dim=(0, 1))


def max_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    mask: torch.Tensor | None,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
) -> torch.Tensor:
    """Softmax attention of several queries over all keys, max over heads, then over the queries: [kv_len] (PruneVid).

    query [1, Hq, Q, d] at prompt positions `query_positions` [Q], key [1, Hkv, T, d] at `key_positions` [T]
    (causal by position), mask None or [1, 1, Q, T], boolean (True = attend) or additive.
    """
    heads, kv_heads, queries, dim = query.shape[1], key.shape[1], query.shape[2], query.shape[-1]
    q = query[0].reshape(kv_heads, heads // kv_heads, queries, dim)
    scores = torch.einsum("hgqd,htd->hgqt", q.float(), key[0].float()) * scaling
    scores = scores.masked_fill(key_positions[None, :] > query_positions[:, None], float("-inf"))
    if mask is not None:
        rows = mask[0, 0]
        scores = scores.masked_fill(~rows, float("-inf")) if rows.dtype == torch.bool else scores + rows.float()
    return scores.softmax(dim=-1).amax(dim=(0, 1)).amax(dim=0)


def top_visual_tokens(visual_attention: torch.Tensor, count: int) -> torch.Tensor:
    """Positions (within the visual span) of the `count` most attended tokens, ascending."""
    return visual_attention.topk(count).indices.sort().values


def attended_key_index(kv_length: int, span: tuple[int, int], kept_visual: torch.Tensor) -> torch.Tensor:
    """Key positions a pruned layer attends to: every non-visual key plus the kept visual ones."""
    start, end = span
    device = kept_visual.device
    return torch.cat([
        torch.arange(start, device=device),
        kept_visual + start,
        torch.arange(end, kv_length, device=device),
    ])  # fmt: skip


@dataclass
class DynamicSelector:
    """Decides, at each decode step, which visual tokens layers >= L attend to.

    Re-selects when this step's visual attention differs from the previous step's (cosine below
    `threshold`). When it does not: `paper` reuses the previous kept set; `official` prunes
    nothing at that step, as the released code does. `one_shot` selects once, at the first
    decode step, and keeps that set (the paper's "w/o DP" ablation).

    Paper mode decides on the device: each step's candidate set is computed and `torch.where` keeps the
    previous set where attention did not move, so a step never makes the host wait (the kept set has the
    same size at every step). Official mode attends to every visual token on a similar step, a set of
    another size, so it reads the similarity on the host once a step, as the released code's `if` does.
    """

    keep_ratio: float
    threshold: float = 0.9
    mode: str = "paper"
    one_shot: bool = False
    previous: torch.Tensor | None = None
    kept: torch.Tensor | None = None
    steps: int = 0
    selections: int = 0  # re-selections decided on the host (first step, official mode)
    moved: torch.Tensor | int = 0  # paper mode's steps whose attention moved, counted on the device
    attended_visual: list[int] = field(default_factory=list)  # visual tokens attended per step

    def reset(self) -> None:
        """Start a new sample. The released code never resets the previous vector; official mode keeps it."""
        if self.mode != "official":
            self.previous = None
        self.kept, self.steps, self.selections, self.moved, self.attended_visual = None, 0, 0, 0, []

    @property
    def reselections(self) -> int:
        """This sample's re-selections (reading paper mode's device count: once, when the sample's figures are taken)."""
        return self.selections + int(self.moved)

    def step(self, visual_attention: torch.Tensor) -> torch.Tensor | None:
        """The kept visual positions for this step, or None to attend to every visual token."""
        self.steps += 1
        previous, self.previous = self.previous, visual_attention
        comparable = previous is not None and previous.shape == visual_attention.shape
        if self.one_shot and self.kept is not None:
            decision = self.kept
        elif self.mode == "paper" and comparable and self.kept is not None:
            similar = torch.nn.functional.cosine_similarity(previous, visual_attention, dim=0) >= self.threshold
            candidate = top_visual_tokens(visual_attention, self.kept.numel())
            self.kept = decision = torch.where(similar, self.kept, candidate)
            self.moved = self.moved + (~similar).int()
        elif self.mode == "official" and comparable and self._similar(previous, visual_attention):
            decision = None
        else:
            count = int(visual_attention.shape[0] * self.keep_ratio)  # DyCoke's released code floors
            self.kept = decision = top_visual_tokens(visual_attention, count)
            self.selections += 1
        self.attended_visual.append(int(decision.numel()) if decision is not None else int(visual_attention.numel()))
        return decision

    def _similar(self, previous: torch.Tensor, visual_attention: torch.Tensor) -> bool:
        return bool(torch.nn.functional.cosine_similarity(previous, visual_attention, dim=0) >= self.threshold)

    def figures(self) -> dict[str, int]:
        """This sample's decode steps and re-selections."""
        return {"decode_steps": self.steps, "reselections": self.reselections}
