"""FastVID's STPrune and DySeg building blocks, shared by its LLaVA (`fastvid.py`) and Qwen2.5-VL (`fastvid_qwen.py`)
forms: batched, padded, with masks.

DySeg's cut on the transition cosines (`transition_similarity`, `dyseg_cuts`), the even shares of a budget
(`split_evenly`, `anchor_frame_count`), ATS (`salient_mask`), DTM's density-peak anchors (`density_anchors`), its merge
groups (`merge_groups`) and the anchor-centric merge (`anchor_centric_merge`). Their arithmetic is described where the
two forms use it (`fastvid.py`, `fastvid_qwen.py`); a frame here is the form's unit (a temporal patch on Qwen2.5-VL).

Every count (salient tokens, anchors, pool sizes per frame and merge group) is planned on the host from the segments
(`Plan`) before any token is chosen, so all frames and merge groups are computed at once, padded to the largest with
masks, without a host read. One topk per distinct per-frame count, as torch.topk breaks ties differently for each k
and the released code asks each frame for its own. The tie-break noise of padded rows, one draw per row in order, is
one draw of their total (equal on the CPU generator; tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch

from dycoke_eval.config import ConfigError
from dycoke_eval.methods.density_peaks import density_scores
from dycoke_eval.methods.padded import below, laid_out, true_first

NEIGHBOURS = 4  # kNN size of the density score, hard-coded in the released code


# ---- DySeg ----


def transition_similarity(frame_features: torch.Tensor) -> torch.Tensor:
    """[F, C] global frame features -> [F-1] cosine of each frame with the next (Eq. 1), in their dtype as released."""
    unit = frame_features / frame_features.norm(dim=1, keepdim=True)
    return (unit[:-1] * unit[1:]).sum(dim=1)


def require_frames(frames: int, c: int, segmentation: str) -> None:
    if frames < c:
        raise ConfigError(
            f"c={c}: {segmentation} segmentation makes at least c segments, but the video has {frames} frames; "
            f"choose c <= {frames} or sample more frames"
        )


def dyseg_cuts(similarity: torch.Tensor, c: int, tau: float) -> torch.Tensor:
    """[F-1] True after each frame where a segment ends (Eq. 2): the c-1 least similar transitions and every one
    below tau."""
    require_frames(similarity.numel() + 1, c, "dyseg")
    least = similarity.topk(c - 1, largest=False).indices
    return (similarity < tau).scatter(0, least, True)


# ---- budgets ----


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` in `parts` shares, the remainder one each to the first shares (LLaVA-Video's released split)."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def anchor_frame_count(length: int, p: int) -> int:
    return (length + p - 1) // p


# ---- ATS, anchors, merging: every frame and segment at once, padded, with the counts planned on the host ----


def top_per_row(scores: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """[B, W] scores -> [B, max(counts)] each row's `scores.topk(counts[b])` indices, padded with 0.

    One topk per distinct count, not one of the largest count cut short: among tied scores (density scores of
    duplicate tokens are 0) torch.topk's choice depends on k, and the released code asks each frame for its own k.
    The topks are laid side by side and each row gathers its own count's columns."""
    distinct = sorted(set(counts) - {0})
    if not distinct:
        return scores.new_zeros(scores.shape[0], 0, dtype=torch.long)
    start = dict(zip(distinct, accumulate([0, *distinct]), strict=False))
    columns = [[start[count] + j if j < count else 0 for j in range(distinct[-1])] for count in counts]
    side_by_side = torch.cat([scores.topk(k, dim=1).indices for k in distinct], dim=1)
    return side_by_side.gather(1, torch.tensor(columns, device=scores.device))


def salient_mask(cls_attention: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """ATS: [F, N] True on each frame's `counts[f]` most attended tokens."""
    frames, tokens = cls_attention.shape
    top = top_per_row(cls_attention, counts).masked_fill(_padding(max(counts), counts, cls_attention.device), tokens)
    mask = torch.zeros(frames, tokens + 1, dtype=torch.bool, device=top.device)  # a last column for the padding
    return mask.scatter_(1, top, True)[:, :tokens]


def _padding(width: int, counts: list[int], device) -> torch.Tensor:
    """The complement of `below`, in one kernel less."""
    return torch.arange(width, device=device) >= torch.tensor(counts, device=device)[:, None]


def tie_break_noise(shape, scale: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor | None:
    """`rand * scale` (the released tie-break), drawn from `generator` (else the global RNG); None when scale is 0."""
    if not scale:
        return None
    draw_on = generator.device if generator is not None else device
    return (torch.rand(tuple(shape), generator=generator, device=draw_on) * scale).to(device)


def padded_noise(rows: list[tuple[int, int]], shape: tuple[int, int], scale: float, generator, device) -> torch.Tensor | None:
    """The released tie-break noise of padded rows: one draw per (row, length) in that order, as one draw of the total
    laid into [B, P] (equal on the CPU generator: consecutive draws are one longer draw); rows drawn for none are 0."""
    lengths = [length for _, length in rows]
    draw = tie_break_noise((sum(lengths),), scale, generator, device)
    if draw is None:
        return None
    starts = torch.tensor(list(accumulate([0, *lengths[:-1]])), device=device)
    noise = torch.zeros(shape, dtype=draw.dtype, device=device)
    return noise.index_copy_(0, torch.tensor([row for row, _ in rows], device=device), laid_out(draw, starts, shape[1]))


@dataclass
class Plan:
    """One video's counts, known on the host before any token is chosen (no sync): per frame its segment,
    salient count, non-salient count and anchor count."""

    segments: list[list[int]]
    salient: list[int]
    anchors: list[int]
    tokens_per_frame: int
    per_frame_anchors: int  # OneVision's m: a segment whose anchor frames hold exactly m merges frame by frame

    @property
    def rest(self) -> list[int]:
        return [self.tokens_per_frame - s for s in self.salient]

    def anchor_frames(self) -> list[int]:
        """Frames with anchors, segments in order and each segment's frames in order (the released draw order)."""
        return [f for segment in self.segments for f in segment if self.anchors[f]]


def density_anchors(
    video: torch.Tensor, rest: torch.Tensor, plan: Plan, variant: str, noise_scale: float, generator
) -> torch.Tensor:
    """[F, A] each frame's anchors as ranks among its non-salient tokens (`rest` [F, R] their positions, ascending),
    the top density scores: OneVision in topk order with one noise draw [F, N-s]; Video sorted by position, each
    anchor frame scored alone with one draw of its own (segments, then frames, in order). Only the anchor frames are
    scored, padded into one batch (a frame's scores depend on its tokens alone); other frames' rows are 0."""
    frames, width = rest.shape
    device, most = video.device, max(plan.anchors)
    scored = [f for f in range(frames) if plan.anchors[f]]
    rows = torch.tensor(scored, device=device)
    counts = [plan.anchors[f] for f in scored]
    if variant == "onevision":  # drawn for every frame, as released, and read for the anchor frames
        valid, noise = None, tie_break_noise((frames, width), noise_scale, generator, device)
        noise = None if noise is None else noise[rows]
    else:
        valid = below(width, [plan.rest[f] for f in scored], device)
        order = {f: row for row, f in enumerate(scored)}
        draws = [(order[f], plan.rest[f]) for f in plan.anchor_frames()]
        noise = padded_noise(draws, (len(scored), width), noise_scale, generator, device)
    chosen = top_per_row(density_scores(video[rows[:, None], rest[rows]], NEIGHBOURS, noise, valid), counts)
    if variant == "video":
        chosen = chosen.masked_fill(_padding(most, counts, device), width).sort(dim=1).values
    return torch.zeros(frames, most, dtype=chosen.dtype, device=device).index_copy_(0, rows, chosen)


@dataclass
class _Groups:
    """Anchors merged together: each group's anchors (flat positions [G, A], valid) and its merge pool."""

    anchors: torch.Tensor
    anchor_valid: torch.Tensor
    pool: torch.Tensor  # [G, P] flat positions, ascending
    pool_valid: torch.Tensor


def merge_groups(
    plan: Plan, anchor_at: torch.Tensor, anchor_valid: torch.Tensor, salient: torch.Tensor, mode: str, variant: str
) -> _Groups:
    """The merge groups of the three rules (`fastvid.py`'s docstring): official, one per anchor frame (its anchors;
    OneVision pools the segment's non-salient tokens, or the frame's own in a segment whose anchor frames hold exactly
    the per-frame budget; Video the segment's minus the frame's own anchors); paper, one per segment with anchors (all
    its anchors; the segment's non-salient tokens that are not anchors). `anchor_at` [F, A]: positions in the frame.

    Which frames feed each group's pool is known on the host; the tokens are chosen from them on the device."""
    frames, per_frame = salient.shape
    device = salient.device
    segment_of = {f: segment for segment in plan.segments for f in segment}
    rest, anchors = plan.rest, plan.anchors
    if mode == "paper":
        members = [[f for f in segment if anchors[f]] for segment in plan.segments]
        members = [frames_ for frames_ in members if frames_]
        pool_frames = [segment_of[m[0]] for m in members]
        sizes = [sum(rest[f] - anchors[f] for f in pool) for pool in pool_frames]
    else:
        members = [[f] for f in plan.anchor_frames()]
        pool_frames = []
        for (f,) in members:
            segment = segment_of[f]
            by_frame = all(anchors[g] == plan.per_frame_anchors for g in segment if anchors[g])
            pool_frames.append([f] if variant == "onevision" and by_frame else segment)
        sizes = [sum(rest[g] for g in pool) - (anchors[m[0]] if variant == "video" else 0)
                 for m, pool in zip(members, pool_frames, strict=True)]  # fmt: skip
    depth = max(len(m) for m in members)
    rows = torch.tensor([m + [m[0]] * (depth - len(m)) for m in members], device=device)  # [G, depth] frames
    row_valid = below(depth, [len(m) for m in members], device)
    flat = anchor_at + torch.arange(frames, device=device)[:, None] * per_frame
    valid = (anchor_valid[rows] & row_valid[..., None]).flatten(1)
    in_pool_frame, own_frame = torch.tensor(
        [[[f in pool for f in range(frames)] for pool in pool_frames], [[f in m for f in range(frames)] for m in members]],
        device=device,
    )[..., None]  # [G, F, 1] each
    in_pool = in_pool_frame & ~salient[None]
    if mode == "paper" or variant == "video":
        is_anchor = torch.zeros(frames, per_frame + 1, dtype=torch.bool, device=device)
        is_anchor = is_anchor.scatter_(1, anchor_at.masked_fill(~anchor_valid, per_frame), True)[:, :per_frame]
        in_pool &= ~(is_anchor[None] & own_frame) if mode == "official" else ~is_anchor[None]
    width = max(sizes)
    return _Groups(flat[rows].flatten(1), valid, true_first(in_pool.flatten(1), width), below(width, sizes, device))


def anchor_centric_merge(
    anchors: torch.Tensor, anchor_valid: torch.Tensor, pool: torch.Tensor, pool_valid: torch.Tensor, beta: float, rule: str
) -> torch.Tensor:
    """[G, A, D] anchors, [G, P, D] merge pools (padded; valid masks) -> [G, A, D]: each pool token joins its most
    cosine-similar anchor of its group (first on ties).

    `official`: `a* = w a + (1 - w) mean(assigned)`, `w = max(1/(n+1), beta)` (an anchor nothing joins stays);
    `paper` (Eq. 5): w = beta when n >= 1, else the anchor stays. Arithmetic in the features' dtype, as released.
    """
    unit_pool, unit_anchors = pool / pool.norm(dim=-1, keepdim=True), anchors / anchors.norm(dim=-1, keepdim=True)
    similarity = (unit_pool @ unit_anchors.transpose(1, 2)).masked_fill(~anchor_valid[:, None], float("-inf"))
    nearest = similarity.argmax(dim=2)
    assigned = torch.zeros(*similarity.shape, dtype=pool.dtype, device=pool.device)
    assigned.scatter_(2, nearest[..., None], pool_valid[..., None].to(pool.dtype))
    count = assigned.sum(dim=1)[..., None]
    mean = assigned.transpose(1, 2) @ pool / count.clamp(min=1)
    if rule == "official":
        weight = (1 / (count + 1)).clamp(min=beta)
    else:
        weight = torch.where(count > 0, beta, 1.0).to(pool.dtype)
    return weight * anchors + (1 - weight) * mean


@dataclass
class FastVIDSelection:
    """What FastVID keeps of one video, and the figures of how."""

    tokens: torch.Tensor  # [M, D]
    index: torch.Tensor  # [M] ascending positions among the F * N video tokens
    segments: list[list[int]]
    salient: int
    anchors: int  # DTM tokens (anchors, or cluster tokens)
