"""FastVID (Shen et al.): DySeg segments the video, STPrune = ATS + DTM prunes within each segment, before the LLM.

Per video: V [F, N, D] pooled projected tokens (no newline), A [F, N] SigLIP pooling-head probe attention
pooled like them, G [F, C] the head's output per frame. Released code: LunarShen/FastVID@a40a109,
`modeling_qwen2.py` of `fastvid_llavaonevision` (OVQ) and `fastvid_llavavideo` (VIQ).

* DySeg (Eq. 1-2): `t_i = cos(G_i, G_i+1)`; cut after frame i for the c-1 smallest t and every t < tau.
* Budgets. `variant="onevision"` (OVQ): per frame `retain = int(N R)`, `m = int(retain d)` anchors (DTM),
  `s = retain - m` salient (ATS); a segment of L frames has ceil(L/p) anchor frames, each with
  `(m L) // ceil(L/p)` anchors (floored: the segment can keep fewer than m L). `variant="video"` (VIQ):
  the split is per segment, `int(retain L d)` anchors and the rest salient, each shared out with the
  remainder one each to the first frames (or first anchor frames), so totals are exactly F * retain
  (the released code hard-codes F=64; any F works here).
* ATS: each frame's top-s tokens by A. DTM: density-peak score over the frame's non-salient tokens
  (`rho = exp(-mean of the 4 smallest squared distances, the token's own 0 included)`, plus
  `rand * density_noise` as the released tie-break, `delta` = distance to the nearest denser token, the
  frame's largest distance for its peak), anchors = top scores, then each token of the merge pool goes to
  its most cosine-similar anchor and the anchor becomes `w a + (1 - w) mean(assigned)`.
* Kept tokens keep their original positions (the stage's `keep_positions`).

`mode="official"` is the released arithmetic, quirks included:
* anchor frames are counted from the segment's END (`(L-1-j) % p == 0`; the last frame is always one);
* OneVision: the merge pool is every non-salient token of the segment, the anchors included, so the anchor
  is in its own mean and `w = max(1/(n+1), beta)` (= beta for beta >= 0.5); in a multi-frame segment each
  anchor frame's anchors take the whole pool separately (one token feeds one anchor in every anchor frame);
  a segment whose anchor frames get exactly m anchors each (every single frame; also p=1, or p=2 with m=1
  and odd L) merges frame by frame within each anchor frame, as the released single-frame path does;
* Video: anchors sorted by position; anchor frame j's pool is the segment minus its salient tokens minus
  j's own anchors (other frames' anchors included), the anchor is not in its own mean, `w = max(1/(n+1),
  beta)`, and an anchor nothing joins stays as it is; one noise draw per anchor frame (OneVision: one [F, N-s]).
`mode="paper"` follows the text: anchor frames every p-th from the segment's first frame (ceil(L/p) of them,
the same count as released: the text's floor(f/p) would leave a segment shorter than p with none, against
"if p is too large, all anchor tokens come from the first frame"); the merge pool is the segment's
non-salient tokens that are not anchors, each assigned to its nearest anchor among all the segment's anchors
("assigns each remaining token to its nearest anchor"), and Eq. 5 as written, `a* = beta a + (1 - beta)
mean(b)` (an anchor with no b stays as it is). Budgets and the density score are the variant's in both modes.

Ablation alternatives (Table 2 and 4; the paper gives no more detail, so these are choices):
* `segmentation="fixed"`: c segments of equal length (F=32, c=8: 4 frames, the paper's interval of 4);
  when c does not divide F the first F mod c segments are one frame longer.
* `segmentation="cluster"`: c clusters of frames by DPC-kNN (the density score above, k=4, with the noise) over
  the L2-normalised G (cosine geometry, as DySeg): centres = the c top scores, every frame joins its nearest
  centre; each cluster is a segment whose frames are taken in time order, so segments may interleave.
* `merging="uniform"` (VisionZip's sampling, Figure 1c): the same anchor frames and counts, but each anchor
  frame's anchors are its non-salient tokens at 0, step, 2 step, ... (step = max(1, n_rest // count)),
  not density peaks; assignment and aggregation as DTM in the chosen mode.
* `merging="cluster"` (Figure 4a, PruneVid's cluster merge): the segment's non-salient tokens form as many
  DPC-kNN clusters (k=4, the density noise) as the segment's anchor budget; each cluster becomes its mean.
  Such tokens have no position of their own ("discard positional information"): they are concatenated at
  the end of the segment, taking its last non-salient grid positions in centre-rank order.

Limits: F < c stops with an error (the released topk fails). d=0 (ATS only, Table 3) keeps the salient tokens
alone; the released OneVision code crashes on it (argmax over zero anchors), the Video code too (an empty
concatenation). The kNN size is min(4, tokens) where a pool is that small.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch

from dycoke_eval.compression.stages import PlannedCounts, PreLLMStage, VideoTokens, per_sample_seed
from dycoke_eval.config import ConfigError
from dycoke_eval.methods.density_peaks import cluster_means, density_scores, dpc_knn
from dycoke_eval.methods.visionzip import contextual_targets

MODES = ("official", "paper")
VARIANTS = ("onevision", "video")
SEGMENTATIONS = ("dyseg", "fixed", "cluster")
MERGINGS = ("dtm", "uniform", "cluster")
NEIGHBOURS = 4  # kNN size of the density score, hard-coded in the released code
NOISE_SEED = 0  # the density tie-break noise is drawn per sample from per_sample_seed(NOISE_SEED, sample)


def check_settings(retention, c, tau, d, p, beta, mode, density_noise, variant, segmentation, merging) -> None:
    """ConfigError naming the first bad setting and its fix."""
    choices = {"mode": (mode, MODES), "variant": (variant, VARIANTS), "segmentation": (segmentation, SEGMENTATIONS)}
    for name, (value, allowed) in {**choices, "merging": (merging, MERGINGS)}.items():
        if value not in allowed:
            raise ConfigError(f"{name}={value!r}; use one of {', '.join(allowed)}")
    if not 0 < retention <= 1:
        raise ConfigError(f"retention={retention}: FastVID keeps a fraction R of the video tokens; choose 0 < R <= 1")
    if not (isinstance(c, int) and c >= 1):
        raise ConfigError(f"c={c}: the minimum number of segments is an integer >= 1")
    if not -1 <= tau <= 1:
        raise ConfigError(f"tau={tau}: the transition threshold is a cosine; choose -1 <= tau <= 1")
    if not 0 <= d <= 1:
        raise ConfigError(f"d={d}: the share of DTM tokens lies in [0, 1] (0: ATS only, 1: DTM only)")
    if not (isinstance(p, int) and p >= 1):
        raise ConfigError(f"p={p}: the anchor-frame interval is an integer >= 1")
    if not 0 <= beta <= 1:
        raise ConfigError(f"beta={beta}: the anchor's weight in Eq. 5 lies in [0, 1]")
    if density_noise < 0:
        raise ConfigError(f"density_noise={density_noise}: the tie-break noise scale is >= 0 (0 turns it off)")


# ---- DySeg and the ablation segmentations ----


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
    """Frames after which a segment ends (Eq. 2): the c-1 least similar transitions and every one below tau, sorted."""
    require_frames(similarity.numel() + 1, c, "dyseg")
    least = similarity.topk(c - 1, largest=False).indices
    below = (similarity < tau).nonzero().flatten()
    return torch.cat([least, below]).unique()


def sizes_from_cuts(cuts: list[int], frames: int) -> list[int]:
    """Segment lengths: the differences of [-1, cuts..., F-1]."""
    bounds = [-1, *cuts, frames - 1]
    return [end - start for start, end in zip(bounds, bounds[1:], strict=False)]


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` in `parts` shares, the remainder one each to the first shares (LLaVA-Video's released split)."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def cluster_segments(frame_features: torch.Tensor, c: int, noise: torch.Tensor | None = None) -> list[list[int]]:
    """Table 2's cluster-based segmentation: c DPC-kNN clusters of the normalised frame features, frames in time order.

    `noise` [F] breaks density ties (identical frames would all be peaks otherwise)."""
    require_frames(frame_features.shape[0], c, "cluster")
    labels, _ = dpc_knn(torch.nn.functional.normalize(frame_features.float(), dim=-1), c, NEIGHBOURS, noise)
    return sorted((labels == k).nonzero().flatten().tolist() for k in range(c))


def fixed_segments(frames: int, c: int) -> list[list[int]]:
    """Table 2's fixed-interval segmentation: c consecutive segments of equal length (the first F mod c one longer)."""
    require_frames(frames, c, "fixed")
    return consecutive(split_evenly(frames, c))


def consecutive(sizes: list[int]) -> list[list[int]]:
    """Segments of these lengths, one after another from frame 0."""
    return [list(range(end - size, end)) for size, end in zip(sizes, accumulate(sizes), strict=True)]


def segment_frames(
    frame_features: torch.Tensor, c: int, tau: float, segmentation: str, noise: torch.Tensor | None = None
) -> list[list[int]]:
    """The video's segments, each a list of frame numbers in time order (`noise`: cluster segmentation's tie-break)."""
    frames = frame_features.shape[0]
    if segmentation == "cluster":
        return cluster_segments(frame_features, c, noise)
    if segmentation == "fixed":
        return fixed_segments(frames, c)
    return consecutive(sizes_from_cuts(dyseg_cuts(transition_similarity(frame_features), c, tau).tolist(), frames))


# ---- budgets ----


def onevision_budget(tokens_per_frame: int, retention: float, d: float) -> tuple[int, int, int]:
    """Per frame (retain, salient, anchors) = (int(N R), retain - int(retain d), int(retain d)), Python floats floored."""
    retain = int(tokens_per_frame * retention)
    anchors = int(retain * d)
    return retain, retain - anchors, anchors


def anchor_frame_count(length: int, p: int) -> int:
    return (length + p - 1) // p


def is_anchor_frame(j: int, length: int, p: int, mode: str) -> bool:
    """official: counted from the segment's end, `(L-1-j) % p == 0`; paper: every p-th frame from the first."""
    return (length - 1 - j) % p == 0 if mode == "official" else j % p == 0


def onevision_anchor_plan(length: int, anchors: int, p: int, mode: str) -> list[int]:
    """Anchors per frame of an L-frame segment: (m L) // ceil(L/p) on each anchor frame, 0 elsewhere."""
    each = anchors * length // anchor_frame_count(length, p)
    return [each if is_anchor_frame(j, length, p, mode) else 0 for j in range(length)]


def video_segment_plan(length: int, retain: int, d: float, p: int, mode: str) -> tuple[list[int], list[int]]:
    """LLaVA-Video's released split of one L-frame segment: (salient, anchors) per frame.

    `int(retain L d)` anchors and the rest salient; salient shared over the frames, anchors over the ceil(L/p)
    anchor frames, each remainder one apiece to the first. The anchor counts are laid on frames 0, p, 2p, ...
    and, in official mode, the list is reversed (anchors on L-1, L-1-p, ..., the largest share on the last).
    """
    total = retain * length
    anchors = int(total * d)
    shares = iter(split_evenly(anchors, anchor_frame_count(length, p)))
    plan = [next(shares) if j % p == 0 else 0 for j in range(length)]
    return split_evenly(total - anchors, length), plan[::-1] if mode == "official" else plan


def frame_budgets(
    segments: list[list[int]], tokens_per_frame: int, retention: float, d: float, p: int, mode: str, variant: str
) -> tuple[list[int], list[int]]:
    """(salient, anchors) per frame of the whole video."""
    frames = sum(len(segment) for segment in segments)
    salient, anchors = [0] * frames, [0] * frames
    retain, per_frame_salient, per_frame_anchors = onevision_budget(tokens_per_frame, retention, d)
    for segment in segments:
        if variant == "onevision":
            shares = [per_frame_salient] * len(segment), onevision_anchor_plan(len(segment), per_frame_anchors, p, mode)
        else:
            shares = video_segment_plan(len(segment), retain, d, p, mode)
        for frame, s, a in zip(segment, *shares, strict=True):
            salient[frame], anchors[frame] = s, a
    return salient, anchors


# ---- ATS, anchors, merging ----


def salient_tokens(cls_attention: torch.Tensor, count: int) -> torch.Tensor:
    """ATS: the frame's `count` tokens of highest [CLS] attention (torch.topk order)."""
    return cls_attention.topk(count).indices


def non_salient(salient: torch.Tensor, tokens: int) -> torch.Tensor:
    """The frame's other token positions, ascending (the order the released code pools them in)."""
    keep = torch.ones(tokens, dtype=torch.bool, device=salient.device)
    keep[salient] = False
    return keep.nonzero().flatten()


def anchor_centric_merge(anchors: torch.Tensor, pool: torch.Tensor, beta: float, rule: str) -> torch.Tensor:
    """[A, D] anchors, [P, D] merge pool -> [A, D]: each pool token joins its most cosine-similar anchor (first on ties).

    `official`: `a* = w a + (1 - w) mean(assigned)`, `w = max(1/(n+1), beta)` (an anchor nothing joins stays);
    `paper` (Eq. 5): w = beta when n >= 1, else the anchor stays. Arithmetic in the features' dtype, as released.
    """
    unit_pool, unit_anchors = pool / pool.norm(dim=-1, keepdim=True), anchors / anchors.norm(dim=-1, keepdim=True)
    nearest = (unit_pool @ unit_anchors.T).argmax(dim=1)
    assigned = torch.zeros(pool.shape[0], anchors.shape[0], dtype=pool.dtype, device=pool.device)
    assigned.scatter_(1, nearest[:, None], 1)
    count = assigned.sum(dim=0)[:, None]
    mean = assigned.T @ pool / count.clamp(min=1)
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


class _Pools:
    """One video's tokens [F, N, D] and each frame's non-salient positions: what DTM draws its pools from."""

    def __init__(self, tokens: torch.Tensor, rest: list[torch.Tensor]) -> None:
        self.tokens, self.rest, self.n = tokens, rest, tokens.shape[1]

    def rest_of(self, frames: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The frames' non-salient tokens [P, D] and their flat positions [P], in position order."""
        where = torch.cat([self.rest[f] + f * self.n for f in frames])
        return self.tokens.flatten(0, 1)[where], where


def density_anchors(
    pools: _Pools, segments: list[list[int]], plan: list[int], variant: str, noise_scale: float, generator
) -> list[torch.Tensor]:
    """Per frame, its anchors as positions among its non-salient tokens: the top density scores.

    OneVision scores every frame in one batch with one noise draw [F, N-s] and keeps topk order; Video scores
    each anchor frame alone (segments, then frames, in order) with one draw each and sorts its anchors by position.
    """
    chosen = [pools.rest[f][:0] for f in range(len(plan))]
    if not any(plan):
        return chosen
    if variant == "onevision":
        pools = torch.stack([pools.tokens[f, rest] for f, rest in enumerate(pools.rest)])
        scores = density_scores(pools, NEIGHBOURS, _noise(pools.shape[:2], noise_scale, generator, pools.device))
        for f, count in enumerate(plan):
            if count:
                chosen[f] = scores[f].topk(count).indices
        return chosen
    for frame in (f for segment in segments for f in segment if plan[f]):
        pool = pools.tokens[frame, pools.rest[frame]][None]
        score = density_scores(pool, NEIGHBOURS, _noise(pool.shape[:2], noise_scale, generator, pool.device))[0]
        chosen[frame] = score.topk(plan[frame]).indices.sort().values
    return chosen


def merge_segment(
    pools: _Pools, segment: list[int], chosen: list[torch.Tensor], beta: float, mode: str, variant: str, per_frame_anchors: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The segment's merged anchors [A, D] and their positions [A] (see the module docstring for the three rules)."""
    frames = [f for f in segment if chosen[f].numel()]
    pool, where = pools.rest_of(segment)
    if not frames:
        return pool[:0], where[:0]
    anchor_index = [pools.rest[f][chosen[f]] + f * pools.n for f in frames]
    anchors = [pools.tokens.flatten(0, 1)[at] for at in anchor_index]
    if mode == "paper":
        outside = ~torch.isin(where, torch.cat(anchor_index))
        merged = [anchor_centric_merge(torch.cat(anchors), pool[outside], beta, "paper")]
    elif variant == "onevision":
        by_frame = all(chosen[f].numel() == per_frame_anchors for f in frames)  # the released single-frame path
        merged = [
            anchor_centric_merge(a, pools.rest_of([f])[0] if by_frame else pool, beta, "official")
            for f, a in zip(frames, anchors, strict=True)
        ]
    else:
        merged = [
            anchor_centric_merge(a, pool[~torch.isin(where, own)], beta, "official")
            for a, own in zip(anchors, anchor_index, strict=True)
        ]
    return torch.cat(merged), torch.cat(anchor_index)


def cluster_merge_segment(
    pools: _Pools, segment: list[int], clusters: int, noise_scale: float, generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Table 4's cluster-based merging: the segment's non-salient tokens as `clusters` DPC-kNN cluster means, placed
    at the segment's last non-salient positions in centre-rank order (their own positions are discarded)."""
    pool, where = pools.rest_of(segment)
    if not clusters:
        return pool[:0], where[:0]
    labels, _ = dpc_knn(pool, clusters, NEIGHBOURS, _noise((pool.shape[0],), noise_scale, generator, pool.device))
    return cluster_means(pool, labels, clusters), where[-clusters:]


def _noise(shape, scale: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor | None:
    """`rand * scale` (the released tie-break), drawn from `generator` (else the global RNG); None when scale is 0."""
    if not scale:
        return None
    draw_on = generator.device if generator is not None else device
    return (torch.rand(tuple(shape), generator=generator, device=draw_on) * scale).to(device)


def fastvid_select(
    video: torch.Tensor,
    cls_attention: torch.Tensor,
    frame_features: torch.Tensor,
    *,
    retention: float,
    c: int = 8,
    tau: float = 0.9,
    d: float = 0.4,
    p: int = 4,
    beta: float = 0.6,
    mode: str = "official",
    density_noise: float = 1e-6,
    variant: str = "onevision",
    segmentation: str = "dyseg",
    merging: str = "dtm",
    generator: torch.Generator | None = None,
) -> FastVIDSelection:
    """`fastvid_tokens` with the figures: segments and the salient and DTM token counts."""
    check_settings(retention, c, tau, d, p, beta, mode, density_noise, variant, segmentation, merging)
    frames, n, _ = video.shape
    frame_noise = _noise((frames,), density_noise, generator, video.device) if segmentation == "cluster" else None
    segments = segment_frames(frame_features, c, tau, segmentation, frame_noise)
    salient_counts, plan = frame_budgets(segments, n, retention, d, p, mode, variant)
    salient = [salient_tokens(cls_attention[f], salient_counts[f]) for f in range(frames)]
    rest = [non_salient(top, n) for top in salient]
    for f, (count, pool) in enumerate(zip(plan, rest, strict=True)):
        if merging != "cluster" and count > pool.numel():
            raise ConfigError(
                f"retention={retention}, d={d}, p={p}: frame {f} needs {count} anchors but has {pool.numel()} "
                "non-salient tokens; lower retention or d, or choose a smaller p"
            )
    pools = _Pools(video, rest)
    kept = [(video[f, top], top + f * n) for f, top in enumerate(salient)]
    if merging == "cluster":
        kept += [cluster_merge_segment(pools, s, sum(plan[f] for f in s), density_noise, generator) for s in segments]
    else:
        if merging == "dtm":
            chosen = density_anchors(pools, segments, plan, variant, density_noise, generator)
        else:
            chosen = [contextual_targets(pool.numel(), count, pool.device) for count, pool in zip(plan, rest, strict=True)]
        per_frame_anchors = onevision_budget(n, retention, d)[2]
        kept += [merge_segment(pools, s, chosen, beta, mode, variant, per_frame_anchors) for s in segments]
    features, index = torch.cat([f for f, _ in kept]), torch.cat([i for _, i in kept])
    order, salient_total = index.argsort(), sum(salient_counts)
    return FastVIDSelection(features[order], index[order], segments, salient_total, int(index.numel()) - salient_total)


def fastvid_tokens(
    video: torch.Tensor,
    cls_attention: torch.Tensor,
    frame_features: torch.Tensor,
    *,
    retention: float,
    c: int = 8,
    tau: float = 0.9,
    d: float = 0.4,
    p: int = 4,
    beta: float = 0.6,
    mode: str = "official",
    density_noise: float = 1e-6,
    variant: str = "onevision",
    segmentation: str = "dyseg",
    merging: str = "dtm",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FastVID on one video: V [F, N, D], A [F, N], G [F, C] -> kept tokens [M, D] and their positions [M] (ascending,
    among the F * N video tokens). `variant="video"` is LLaVA-Video's released arithmetic (any F, not just 64);
    `density_noise=0` turns the tie-break noise off; `generator` draws it (default: the global RNG)."""
    selection = fastvid_select(
        video,
        cls_attention,
        frame_features,
        retention=retention,
        c=c,
        tau=tau,
        d=d,
        p=p,
        beta=beta,
        mode=mode,
        density_noise=density_noise,
        variant=variant,
        segmentation=segmentation,
        merging=merging,
        generator=generator,
    )
    return selection.tokens, selection.index


@dataclass
class FastVID(PreLLMStage):
    retention: float = 0.25  # R: fraction of the video tokens kept
    c: int = 8  # minimum number of segments
    tau: float = 0.9  # transition-similarity threshold
    d: float = 0.4  # share of the kept tokens from DTM (the rest from ATS)
    p: int = 4  # anchor-frame interval
    beta: float = 0.6  # anchor weight in the merge
    mode: str = "official"  # official | paper
    segmentation: str = "dyseg"  # dyseg | fixed | cluster (Table 2)
    merging: str = "dtm"  # dtm | uniform | cluster (Table 4)
    density_noise: float = 1e-6  # scale of the released density tie-break noise; 0 turns it off
    name: str = "fastvid"
    keep_positions = True  # kept tokens keep their original positions, as the released code does

    def __post_init__(self) -> None:
        check_settings(
            self.retention,
            self.c,
            self.tau,
            self.d,
            self.p,
            self.beta,
            self.mode,
            self.density_noise,
            "onevision",
            self.segmentation,
            self.merging,
        )

    def needs(self) -> frozenset[str]:
        return frozenset({"probe_attention", "probe_features"})

    @staticmethod
    def variant_for(newlines: str) -> str:
        """LLaVA-Video (a newline after each row) gets its released arithmetic; every other layout OneVision's."""
        return "video" if newlines == "row_end" else "onevision"

    def select(self, tokens: VideoTokens, signals: dict[str, torch.Tensor], sample: str) -> VideoTokens:
        variant = self.variant_for(tokens.newlines)
        selection = fastvid_select(
            tokens.grid(),
            signals["probe_attention"],
            signals["probe_features"],
            retention=self.retention,
            c=self.c,
            tau=self.tau,
            d=self.d,
            p=self.p,
            beta=self.beta,
            mode=self.mode,
            density_noise=self.density_noise,
            variant=variant,
            segmentation=self.segmentation,
            merging=self.merging,
            generator=torch.Generator().manual_seed(per_sample_seed(NOISE_SEED, sample)),
        )
        return tokens.replaced(
            selection.tokens,
            selection.index,
            fastvid_variant=variant,
            fastvid_segments=len(selection.segments),
            fastvid_segment_sizes=[len(s) for s in selection.segments],
            fastvid_salient=selection.salient,
            fastvid_anchors=selection.anchors,
            fastvid_tokens_out=int(selection.index.numel()),
        )

    def planned_tokens(self, counts: PlannedCounts) -> float:
        """F * int(N R), the nominal count, exact for LLaVA-Video's arithmetic (per-segment shares sum exactly).

        With fixed-interval segments the count does not depend on the video and is computed exactly. Otherwise,
        on OneVision, the anchor floor `(m L) // ceil(L/p)` can make the measured count lower than planned, by
        an amount that depends on the segment lengths found (R=0.10, F=32: a 5-frame segment keeps 34 anchors
        of 35); the plan stays nominal there.
        """
        layout = counts.layout
        require_frames(layout.frames, self.c, self.segmentation)
        if self.segmentation == "fixed":
            segments, variant = fixed_segments(layout.frames, self.c), self.variant_for(layout.newlines)
            salient, anchors = frame_budgets(
                segments, layout.tokens_per_frame, self.retention, self.d, self.p, self.mode, variant
            )
            return float(sum(salient) + sum(anchors))
        return float(layout.frames * int(layout.tokens_per_frame * self.retention))
