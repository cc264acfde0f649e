"""DyCoke stage 1, token temporal merging (TTM): which video tokens enter the LLM.

Frames are taken in windows of 4 (frames 4w..4w+3). Within a window the first frame stays whole;
frame 1 is compared with frame 0, frame 3 with frame 2 and frame 2 with frame 0, token by token
at the same spatial position (cosine similarity), and each compared frame keeps only its
`int((1-k)*N)` least similar tokens, the ones that changed most. "Merging" is dropping, as in
the authors' code: nothing is averaged.

`mode="paper"` is that algorithm, applied to every window including a short last one, with kept
tokens in spatial order. `mode="official"` reproduces the released code's selection exactly:
the frame-2-vs-0 step skips the last full window, the similarity compares raw features, and
kept tokens come out in ascending-similarity order. Where the released code crashes (F <= 4)
or silently drops the last frame (odd F), official mode keeps going: the unpaired last frame
stays whole, and `ttm_plan` says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MODES = ("paper", "official")


@dataclass(frozen=True)
class TTMPlan:
    """For each frame, the frame it is compared with (-1: kept whole), and notes on deviations."""

    reference: tuple[int, ...]
    notes: tuple[str, ...] = ()


def ttm_plan(frames: int, mode: str) -> TTMPlan:
    """Which frame each frame is pruned against, as a pure function of F and the mode."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; use one of {', '.join(MODES)}")
    reference = [-1] * frames
    for frame in range(frames):
        position = frame % 4
        if position in (1, 3):
            reference[frame] = frame - 1
    notes = []
    if mode == "paper":
        for start in range(0, frames, 4):
            if start + 2 < frames:
                reference[start + 2] = start
    else:
        # The released code pairs frames (0,1), (2,3), ... only up to F-1 and runs the 2-vs-0
        # step for windows starting at 0, 4, ..., F-8.
        for start in range(0, frames - 4, 4):
            reference[start + 2] = start
        if frames % 2:
            notes.append(f"odd F={frames}: the released code drops the last frame; it is kept whole here")
        if frames <= 4:
            notes.append(f"F={frames}: the released code crashes for F <= 4; only the pairwise step ran")
    return TTMPlan(tuple(reference), tuple(notes))


def tokens_to_keep(tokens_per_frame: int, k: float) -> int:
    """Tokens a pruned frame keeps: `int((1-k)*N)`, the released code's rounding."""
    return int((1 - k) * tokens_per_frame)


def ttm_keep_indices(features: torch.Tensor, k: float, mode: str = "paper") -> torch.Tensor:
    """[F, N, D] frame features -> flat indices into F*N of the kept tokens, in emitted order."""
    if not 0 <= k < 1:
        raise ValueError(f"k={k}: TTM's pruning rate must be in [0, 1)")
    frames, tokens, _ = features.shape
    plan = ttm_plan(frames, mode)
    flat = torch.arange(frames * tokens, device=features.device).view(frames, tokens)
    pairs = [(frame, ref) for frame, ref in enumerate(plan.reference) if ref >= 0]
    if not pairs:
        return flat.flatten()
    similarity = _pair_similarity(features, pairs, mode)
    selected = similarity.topk(tokens_to_keep(tokens, k), dim=-1, largest=False).indices  # ascending similarity
    if mode == "paper":
        selected = selected.sort(dim=-1).values  # spatial order
    pruned_rows = dict(zip((frame for frame, _ in pairs), selected + flat[[f for f, _ in pairs], :1], strict=True))
    return torch.cat([pruned_rows.get(frame, flat[frame]) for frame in range(frames)])


def _pair_similarity(features: torch.Tensor, pairs: list[tuple[int, int]], mode: str) -> torch.Tensor:
    """[len(pairs), N] cosine similarity of each pruned frame with its reference, token by token."""
    current = [frame for frame, _ in pairs]
    reference = [ref for _, ref in pairs]
    if mode == "official":  # the released code's exact ops: L2-normalised rows in the pairwise step only
        normalize, cosine = torch.nn.functional.normalize, torch.nn.functional.cosine_similarity
        return torch.stack([
            cosine(normalize(features[f], dim=-1), normalize(features[r], dim=-1), dim=-1) if f % 2
            else cosine(features[f], features[r], dim=-1)
            for f, r in pairs
        ])  # fmt: skip
    # Memory-bound: one pass for the norms, then per-frame dot products that stay in cache.
    norms = torch.linalg.vector_norm(features, dim=-1)
    dots = torch.stack([torch.linalg.vecdot(features[f], features[r]) for f, r in pairs])
    return dots / (norms[current] * norms[reference]).clamp_min(1e-8)


def random_keep_indices(features: torch.Tensor, k: float, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Table 5's "random pruning": TTM's frame plan and counts, random tokens in each pruned frame."""
    if not 0 <= k < 1:
        raise ValueError(f"k={k}: TTM's pruning rate must be in [0, 1)")
    frames, tokens, _ = features.shape
    keep = tokens_to_keep(tokens, k)
    pieces = []
    for frame, reference in enumerate(ttm_plan(frames, mode).reference):
        chosen = torch.arange(tokens) if reference < 0 else torch.randperm(tokens, generator=generator)[:keep].sort().values
        pieces.append(chosen.to(features.device) + frame * tokens)
    return torch.cat(pieces)
