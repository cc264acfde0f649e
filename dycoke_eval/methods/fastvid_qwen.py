"""FastVID on Qwen2.5-VL, as its authors released it (`method=fastvid` on the `qwen2_5_vl` family, mode=official).

Source: LunarShen/FastVID@a40a109, `fastvid_qwen25vl/lmms-eval/lmms_eval/models/qwenvlutils/modeling_qwen2_5_vl.py`
(MQ), `Qwen2_5_VLForConditionalGeneration.forward`, MQ:1836-2099 (docs/qwen.md, section c). The unit is the
temporal patch (2 frames): V [T, N, D] merged tokens (raster order), A [T, N] the last ViT block's mean-query
attention over them (the adapter's `probe_attention`, `models/qwen_salience.py`), G [T, D] each patch's mean token
(its `probe_features`, in V's dtype), L2-normalised here (MQ:1836, 1899).

* **DySeg** (MQ:1900-1915): `s_i = G_i . G_i+1`; cut after the c-1 smallest s and every s < tau (0.84 released).
* **Redundant patches** (Qwen only, `DySeg_ignore` = 0.95, MQ:1932-1945): inside a segment of L > 1 patches, the
  runs of patches joined by s >= ignore are collapsed: only the last patch of each run ("valid", V of them per
  segment) gets tokens, the others none.
* **Budgets** (MQ:1920-1989): `retain = int(N R)` per patch; a segment keeps `ctx = max(int(retain L d), 1)` DTM
  and `sal = retain L - ctx` ATS tokens. L = 1: (sal, ctx) on its patch, uncapped. L > 1: sal split over the V
  valid patches (the remainder one each to the first), ctx over ceil(V/p) anchor patches (the remainder one each
  to the first share), shares laid on valid patches 0, p, 2p, ... each capped at N // 2, then the list REVERSED
  (the anchor patches count from the segment's end, the largest share on the last); a valid patch keeps
  `min(its ctx, N // 2)` DTM and `min(its sal, N - that)` ATS tokens. What the caps cut is lost, not moved
  (eval.sh: R = 27% kept 24.1%).
* **ATS** (MQ:1997): a patch's top-`sal` tokens by A.
* **DTM** (MQ:2000-2075): on each anchor patch, density peaks over its non-salient tokens (`cdist / sqrt(D)` in
  float32, rho = exp(-mean of the 4 smallest squared distances, its own 0 included) + `rand * 1e-6`, delta =
  distance to the nearest denser token, score = rho delta, top-ctx sorted by position); then every token of the
  segment (all L patches, the collapsed ones included) that is neither salient in the segment nor one of this
  patch's anchors joins its most cosine-similar anchor, and `a* = w a + (1 - w) mean(joined)`, `w = max(1/(n+1),
  beta)`; an anchor nothing joins stays; other anchor patches' anchors are in the pool. The merge arithmetic runs
  in V's dtype (bf16 on a GPU: `w` and the counts too), as released.

This is LLaVA-Video's released segment arithmetic (`fastvid.py`, `variant="video"`) plus the collapse, the caps and
`max(., 1)`; the tokens are chosen by `stprune.py`'s building blocks (all patches and merge groups at once, padded,
with masks). One host read: the segment cuts and the redundant-patch cuts together. Kernels per video
(`count_ops`, bf16, D = 3584, R = 0.27, c = 8): 142 at 8 x 1200 tokens, 146-149 at 16 x 300, 151-153 at 60 x 299,
163-164 at 384 x 42 (Video-MME's long videos: 768 frames at 2 fps, 16384 tokens), G's means (one more) made by the
encoder: one topk per distinct per-patch salient or DTM count comes on top of ~140 (torch.topk breaks ties
differently for each k, and the release asks each patch for its own k).

Equal to the release on the CPU (tested against a literal transcription): the kept positions and per-patch counts,
the merged features bit for bit in bf16 and fp16, within 1e-5 in float32 (batched merge products). Not equal where
two density scores tie exactly at an anchor patch's k-th place (exact duplicate tokens, the 1e-6 noise
notwithstanding): the CPU's topk then picks by the row's length, and ours are padded. A dead write of the release
(`temp_context_num[...] = frm_len - ...` after the share is used, MQ:1965-1966) changes nothing and is not kept.

Where the release fails, this runs: T < c (its `topk` raises) is a ConfigError; c = 1 with no transition below tau
(its `cut_indices[0]` raises) is one segment; a segment with no salient or no anchor token (`int(N R)` of 0 or 1,
tiny grids; its `torch.cat([])` raises) keeps what it has; a non-salient pool of fewer than 4 tokens takes its kNN
over them all (its `topk(k=4)` raises). With `int(N R) = 0`, `sal = -1`: no salient token, as its `if > 0` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dycoke_eval.config import ConfigError
from dycoke_eval.methods.padded import below, true_first
from dycoke_eval.methods.stprune import (
    FastVIDSelection,
    Plan,
    anchor_centric_merge,
    anchor_frame_count,
    density_anchors,
    dyseg_cuts,
    merge_groups,
    salient_mask,
    split_evenly,
    transition_similarity,
)

# The released settings (fastvid_qwen25vl/scripts/eval.sh and the wrapper's defaults, lmms_eval/models/qwen2_5_vl.py).
RELEASED = {"retention": 0.27, "c": 8, "tau": 0.84, "ignore": 0.95, "d": 0.4, "p": 4, "beta": 0.6}
DYSEG_IGNORE = RELEASED["ignore"]


def require_patches(patches: int, c: int) -> None:
    if patches < c:
        raise ConfigError(
            f"c={c}: DySeg makes at least c segments, but the video has {patches} temporal patches ({2 * patches} "
            f"frames); choose c <= {patches} or sample at least {2 * c} frames"
        )


def segments_and_runs(frame_features: torch.Tensor, c: int, tau: float, ignore: float) -> tuple[list[list[int]], list[list[int]]]:
    """G [T, D] -> DySeg's segments (patch numbers) and, per segment, the lengths of its runs of redundant patches
    (s >= ignore within the segment; a one-patch segment is one run). The one host read: both cut masks at once.
    `s` is the cosine of each patch's G with the next's, G normalised once (MQ:1899-1900, as `transition_similarity`)."""
    require_patches(frame_features.shape[0], c)
    similarity = transition_similarity(frame_features)
    cuts = dyseg_cuts(similarity, c, tau)
    segment_cut, run_cut = torch.stack([cuts, cuts | (similarity < ignore)]).tolist()
    segments, runs, current = [], [], []
    start = run_start = 0
    for patch, (segment_ends, run_ends) in enumerate(zip([*segment_cut, True], [*run_cut, True], strict=True)):
        if run_ends:  # every segment end is a run end
            current.append(patch + 1 - run_start)
            run_start = patch + 1
        if segment_ends:
            segments.append(list(range(start, patch + 1)))
            runs.append(current)
            start, current = patch + 1, []
    return segments, runs


def segment_budget(runs: list[int], tokens: int, retain: int, d: float, p: int) -> tuple[list[int], list[int]]:
    """(salient, DTM) counts per patch of one segment with these run lengths, as MQ:1926-1989 computes them (salient
    may be -1 where `int(N R) = 0`; read as none)."""
    length = sum(runs)
    total = retain * length
    anchors = max(int(total * d), 1)
    salient = total - anchors
    if length == 1:
        return [salient], [anchors]
    valid, half = len(runs), tokens // 2
    salient_shares = split_evenly(salient, valid)
    anchor_shares = split_evenly(anchors, anchor_frame_count(valid, p))
    laid = [min(anchor_shares[i // p], half) if i % p == 0 else 0 for i in range(valid)][::-1]
    per_salient, per_anchors = [], []
    for run, s, a in zip(runs, salient_shares, laid, strict=True):
        kept_anchors = min(a, half)
        per_salient += [0] * (run - 1) + [min(s, tokens - kept_anchors)]
        per_anchors += [0] * (run - 1) + [kept_anchors]
    return per_salient, per_anchors


def patch_budgets(runs: list[list[int]], tokens: int, retention: float, d: float, p: int) -> tuple[list[int], list[int]]:
    """(salient, DTM) counts per temporal patch of the whole video, salient floored at 0."""
    retain = int(tokens * retention)
    salient, anchors = [], []
    for segment_runs in runs:
        s, a = segment_budget(segment_runs, tokens, retain, d, p)
        salient += [max(n, 0) for n in s]
        anchors += a
    return salient, anchors


@dataclass
class QwenFastVIDSelection(FastVIDSelection):
    empty_patches: int = 0  # temporal patches given no token (collapsed redundant ones)


def fastvid_qwen_select(
    video: torch.Tensor,
    salience: torch.Tensor,
    frame_features: torch.Tensor,
    *,
    retention: float,
    c: int = RELEASED["c"],
    tau: float = RELEASED["tau"],
    ignore: float = DYSEG_IGNORE,
    d: float = RELEASED["d"],
    p: int = RELEASED["p"],
    beta: float = RELEASED["beta"],
    density_noise: float = 1e-6,
    generator: torch.Generator | None = None,
) -> QwenFastVIDSelection:
    """FastVID's released Qwen2.5-VL arithmetic on one video: V [T, N, D], A [T, N], G [T, D] (each patch's mean token,
    `video.mean(1)`) -> the kept tokens [M, D] and their positions [M] among the T * N (ascending; a merged token at
    its anchor's), with the segments and counts. `density_noise` scales the released `rand * 1e-6` tie-break (0: off),
    drawn from `generator` (else the global RNG)."""
    patches, n, _ = video.shape
    segments, runs = segments_and_runs(frame_features, c, tau, ignore)
    salient_counts, anchor_counts = patch_budgets(runs, n, retention, d, p)
    plan = Plan(segments, salient_counts, anchor_counts, n, 0)
    salient = salient_mask(salience, plan.salient)
    flat = video.flatten(0, 1)
    out, kept = torch.cat([flat, flat[:1]]), torch.cat([salient.flatten(), salient.new_zeros(1)])  # a last row: padding
    if any(plan.anchors):
        rest = true_first(~salient, max(plan.rest))
        chosen = density_anchors(video, rest, plan, "video", density_noise, generator)
        anchor_valid = below(chosen.shape[1], plan.anchors, video.device)
        anchor_at = rest.gather(1, chosen.clamp(max=rest.shape[1] - 1))
        groups = merge_groups(plan, anchor_at, anchor_valid, salient, "official", "video")
        merged = anchor_centric_merge(
            flat[groups.anchors], groups.anchor_valid, flat[groups.pool], groups.pool_valid, beta, "official"
        )
        at = groups.anchors.masked_fill(~groups.anchor_valid, patches * n).flatten()
        out.index_copy_(0, at, merged.flatten(0, 1))
        kept.index_fill_(0, at, True)
    total_salient, total_anchors = sum(plan.salient), sum(plan.anchors)
    index = true_first(kept[:-1], total_salient + total_anchors)
    empty = sum(1 for s, a in zip(plan.salient, plan.anchors, strict=True) if s + a == 0)
    return QwenFastVIDSelection(out[index], index, segments, total_salient, total_anchors, empty)
