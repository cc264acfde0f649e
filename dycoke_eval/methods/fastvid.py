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

On an accelerator: the segments are the one value the host reads; the tokens are chosen by `stprune.py`'s
building blocks, all frames and merge groups at once, padded with masks: 105-144 kernels per video at the real sizes
whatever the segments (`scripts/bench_gpu.py --cpu-counts`). Equal to the released code on the CPU, bit for bit in
half precision; in float32 the batched merge products differ from the per-group ones in the last bits (within 1e-5).

Qwen2.5-VL (`qwen2_5_vl`): its released arithmetic is `fastvid_qwen.py` (temporal patches; A the last ViT block's
mean-query attention and G each temporal patch's mean merged token, the adapter's same two probe signals; the
redundant-patch collapse and caps), mode=official with DySeg and DTM only. `tau=None` (the default) is each family's
released value (`RELEASED_TAU`: 0.9 LLaVA, 0.84 Qwen2.5-VL), resolved per video from its layout's family.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch

from dycoke_eval.compression.stages import ModelInfo, PlannedCounts, PreLLMStage, VideoTokens, per_sample_seed
from dycoke_eval.config import ConfigError
from dycoke_eval.methods.density_peaks import batched_dpc_knn, cluster_means, dpc_knn
from dycoke_eval.methods.fastvid_qwen import RELEASED as QWEN_RELEASED
from dycoke_eval.methods.fastvid_qwen import fastvid_qwen_select, require_patches
from dycoke_eval.methods.padded import below, true_first
from dycoke_eval.methods.stprune import (
    NEIGHBOURS,
    FastVIDSelection,
    Plan,
    anchor_centric_merge,
    anchor_frame_count,
    density_anchors,
    dyseg_cuts,
    merge_groups,
    padded_noise,
    require_frames,
    salient_mask,
    split_evenly,
    tie_break_noise,
    transition_similarity,
)

MODES = ("official", "paper")
VARIANTS = ("onevision", "video")
QWEN = "qwen2_5_vl"  # Qwen2.5-VL's released arithmetic: fastvid_qwen.py
RELEASED_VARIANTS = {"llava_onevision": "onevision", "llava_video": "video", QWEN: QWEN}  # model family -> its released code
RELEASED_TAU = {"onevision": 0.9, "video": 0.9, QWEN: QWEN_RELEASED["tau"]}  # each eval.sh's fastvid_DySeg_tau
SEGMENTATIONS = ("dyseg", "fixed", "cluster")
MERGINGS = ("dtm", "uniform", "cluster")
NOISE_SEED = 0  # the density tie-break noise is drawn per sample from per_sample_seed(NOISE_SEED, sample), on the
# tokens' device (no copy from the host; a GPU draws other values than the CPU for the same seed)


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
    if tau is not None and not -1 <= tau <= 1:
        raise ConfigError(f"tau={tau}: the transition threshold is a cosine; choose -1 <= tau <= 1")
    if not 0 <= d <= 1:
        raise ConfigError(f"d={d}: the share of DTM tokens lies in [0, 1] (0: ATS only, 1: DTM only)")
    if not (isinstance(p, int) and p >= 1):
        raise ConfigError(f"p={p}: the anchor-frame interval is an integer >= 1")
    if not 0 <= beta <= 1:
        raise ConfigError(f"beta={beta}: the anchor's weight in Eq. 5 lies in [0, 1]")
    if density_noise < 0:
        raise ConfigError(f"density_noise={density_noise}: the tie-break noise scale is >= 0 (0 turns it off)")


# ---- segments: DySeg (its cut in stprune.py) and the ablation segmentations ----


def sizes_from_cuts(cuts: list[int], frames: int) -> list[int]:
    """Segment lengths: the differences of [-1, cuts..., F-1]."""
    bounds = [-1, *cuts, frames - 1]
    return [end - start for start, end in zip(bounds, bounds[1:], strict=False)]


def cluster_segments(frame_features: torch.Tensor, c: int, noise: torch.Tensor | None = None) -> list[list[int]]:
    """Table 2's cluster-based segmentation: c DPC-kNN clusters of the normalised frame features, frames in time order.

    `noise` [F] breaks density ties (identical frames would all be peaks otherwise)."""
    require_frames(frame_features.shape[0], c, "cluster")
    labels, _ = dpc_knn(torch.nn.functional.normalize(frame_features.float(), dim=-1), c, NEIGHBOURS, noise)
    frames_of = [[] for _ in range(c)]
    for frame, label in enumerate(labels.tolist()):
        frames_of[label].append(frame)
    return sorted(frames_of)


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
    cuts = dyseg_cuts(transition_similarity(frame_features), c, tau).tolist()  # the selection's one host read
    return consecutive(sizes_from_cuts([frame for frame, cut in enumerate(cuts) if cut], frames))


# ---- budgets ----


def onevision_budget(tokens_per_frame: int, retention: float, d: float) -> tuple[int, int, int]:
    """Per frame (retain, salient, anchors) = (int(N R), retain - int(retain d), int(retain d)), Python floats floored."""
    retain = int(tokens_per_frame * retention)
    anchors = int(retain * d)
    return retain, retain - anchors, anchors


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


# ---- the ablation anchors and merging (Table 4) ----


def uniform_anchors(plan: Plan, device) -> torch.Tensor:
    """[F, A] VisionZip's sampling as anchors: ranks 0, step, 2 step, ... (step = max(1, rest // count))."""
    steps = [max(1, rest // count) if count else 0 for rest, count in zip(plan.rest, plan.anchors, strict=True)]
    return torch.arange(max(plan.anchors), device=device) * torch.tensor(steps, device=device)[:, None]


def cluster_merge(
    video: torch.Tensor, salient: torch.Tensor, plan: Plan, noise_scale: float, generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Table 4's cluster-based merging: each segment's non-salient tokens as its anchor budget of DPC-kNN cluster means,
    placed at the segment's last non-salient positions in centre-rank order (their own positions are discarded).
    Returns the means [S, K, D], their flat positions [S, K] and which are real."""
    frames, per_frame, _ = video.shape
    device = video.device
    clusters = [sum(plan.anchors[f] for f in segment) for segment in plan.segments]
    sizes = [sum(plan.rest[f] for f in segment) for segment in plan.segments]
    width = max(sizes)
    frame_of = torch.arange(frames, device=device).repeat_interleave(per_frame)
    member = torch.zeros(len(plan.segments), frames, dtype=torch.bool)
    for number, segment in enumerate(plan.segments):
        member[number, segment] = True
    in_pool = member.to(device)[:, frame_of] & ~salient.flatten()[None]
    where, valid = true_first(in_pool, width), below(width, sizes, device)
    pool = video.flatten(0, 1)[where]
    rows = [(s, sizes[s]) for s, count in enumerate(clusters) if count]
    noise = padded_noise(rows, tuple(where.shape), noise_scale, generator, device)
    labels, _ = batched_dpc_knn(pool, valid, torch.tensor(clusters, device=device), NEIGHBOURS, noise)
    means = cluster_means(pool, labels, width)
    rank = torch.arange(width, device=device)
    last = (torch.tensor(sizes, device=device) - torch.tensor(clusters, device=device))[:, None] + rank
    return means, where.gather(1, last.clamp(max=width - 1)), below(width, clusters, device)


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
    """`fastvid_tokens` with the figures: segments and the salient and DTM token counts.

    One host read (the segments); every count after it follows from them on the host, so the tokens are chosen
    over all frames and segments at once."""
    check_settings(retention, c, tau, d, p, beta, mode, density_noise, variant, segmentation, merging)
    frames, n, _ = video.shape
    frame_noise = tie_break_noise((frames,), density_noise, generator, video.device) if segmentation == "cluster" else None
    segments = segment_frames(frame_features, c, tau, segmentation, frame_noise)
    plan = Plan(segments, *frame_budgets(segments, n, retention, d, p, mode, variant), n, onevision_budget(n, retention, d)[2])
    for f, (count, rest) in enumerate(zip(plan.anchors, plan.rest, strict=True)):
        if merging != "cluster" and count > rest:
            raise ConfigError(
                f"retention={retention}, d={d}, p={p}: frame {f} needs {count} anchors but has {rest} "
                "non-salient tokens; lower retention or d, or choose a smaller p"
            )
    salient = salient_mask(cls_attention, plan.salient)
    flat = video.flatten(0, 1)
    out, kept = torch.cat([flat, flat[:1]]), torch.cat([salient.flatten(), salient.new_zeros(1)])  # a last row: padding
    if any(plan.anchors):
        if merging == "cluster":
            merged, at, valid = cluster_merge(video, salient, plan, density_noise, generator)
        else:
            rest = true_first(~salient, max(plan.rest))
            if merging == "dtm":
                chosen = density_anchors(video, rest, plan, variant, density_noise, generator)
            else:
                chosen = uniform_anchors(plan, video.device)
            anchor_valid = below(chosen.shape[1], plan.anchors, video.device)
            anchor_at = rest.gather(1, chosen.clamp(max=rest.shape[1] - 1))
            groups = merge_groups(plan, anchor_at, anchor_valid, salient, mode, variant)
            merged = anchor_centric_merge(
                flat[groups.anchors], groups.anchor_valid, flat[groups.pool], groups.pool_valid, beta, mode
            )
            at, valid = groups.anchors, groups.anchor_valid
        at = at.masked_fill(~valid, frames * n).flatten()
        out.index_copy_(0, at, merged.flatten(0, 1))
        kept.index_fill_(0, at, True)
    index = true_first(kept[:-1], sum(plan.salient) + sum(plan.anchors))
    return FastVIDSelection(out[index], index, segments, sum(plan.salient), sum(plan.anchors))


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
    tau: float | None = None  # transition-similarity threshold; None: the family's released one (RELEASED_TAU)
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
        """A [F, N] a probe query's attention over each frame's tokens, and G [F, C] each frame's global feature, as
        each model family gives them (its adapter's docstring)."""
        return frozenset({"probe_attention", "probe_features"})

    def check(self, model: ModelInfo) -> None:
        if model.family not in RELEASED_VARIANTS:
            raise ConfigError(
                f"{self.name}: FastVID's released arithmetic exists for {', '.join(RELEASED_VARIANTS)}, not for the "
                f"{model.family!r} model family; run it on one of those, or choose another method"
            )
        if model.family == QWEN and self.mode != "official":
            raise ConfigError(
                f"mode={self.mode!r}: FastVID on Qwen2.5-VL exists only as its released code (mode=official); the paper "
                "form is transcribed for the LLaVA models"
            )
        if model.family == QWEN and (self.segmentation, self.merging) != ("dyseg", "dtm"):
            raise ConfigError(
                f"segmentation={self.segmentation!r}, merging={self.merging!r}: FastVID's Qwen2.5-VL code has DySeg and "
                "DTM only (the Table 2 and 4 ablations ran on LLaVA-OneVision); use segmentation=dyseg merging=dtm"
            )
        super().check(model)

    def describe(self, family: str | None = None) -> dict:
        """On a family with released arithmetic, `tau` is the one that runs there (null in the config: the release's)."""
        settings = super().describe(family)
        if family in RELEASED_VARIANTS:
            settings["tau"] = self.tau_for(self.variant_for(family))
        return settings

    def tau_for(self, variant: str) -> float:
        """The transition threshold on the released arithmetic `variant`: `tau`, else that release's."""
        return RELEASED_TAU[variant] if self.tau is None else self.tau

    @staticmethod
    def variant_for(family: str) -> str:
        """The released arithmetic of the model family (`RELEASED_VARIANTS`)."""
        return RELEASED_VARIANTS[family]

    def select(self, tokens: VideoTokens, signals: dict[str, torch.Tensor], sample: str) -> VideoTokens:
        variant = self.variant_for(tokens.layout.family)
        generator = torch.Generator(tokens.features.device).manual_seed(per_sample_seed(NOISE_SEED, sample))
        if variant == QWEN:
            return self._select_qwen(tokens, signals, generator)
        selection = fastvid_select(
            tokens.grid(),
            signals["probe_attention"],
            signals["probe_features"],
            retention=self.retention,
            c=self.c,
            tau=self.tau_for(variant),
            d=self.d,
            p=self.p,
            beta=self.beta,
            mode=self.mode,
            density_noise=self.density_noise,
            variant=variant,
            segmentation=self.segmentation,
            merging=self.merging,
            generator=generator,
        )
        return kept_with_figures(tokens, selection, variant)

    def _select_qwen(self, tokens: VideoTokens, signals: dict[str, torch.Tensor], generator) -> VideoTokens:
        selection = fastvid_qwen_select(
            tokens.grid(),
            signals["probe_attention"],
            signals["probe_features"],
            retention=self.retention,
            c=self.c,
            tau=self.tau_for(QWEN),
            d=self.d,
            p=self.p,
            beta=self.beta,
            density_noise=self.density_noise,
            generator=generator,
        )
        return kept_with_figures(tokens, selection, QWEN, fastvid_empty_patches=selection.empty_patches)

    def planned_tokens(self, counts: PlannedCounts) -> float:
        """F * int(N R), the nominal count, exact for LLaVA-Video's arithmetic (per-segment shares sum exactly).

        With fixed-interval segments the count does not depend on the video and is computed exactly. Otherwise,
        on OneVision, the anchor floor `(m L) // ceil(L/p)` can make the measured count lower than planned, by
        an amount that depends on the segment lengths found (R=0.10, F=32: a 5-frame segment keeps 34 anchors
        of 35); the plan stays nominal there. Qwen2.5-VL (F = temporal patches): nominal, an upper bound but for
        `int(N R) = 0`; its caps and collapsed patches keep fewer (exact when every segment is one patch).
        """
        layout = counts.layout
        if layout.family == QWEN:
            require_patches(layout.frames, self.c)
            return float(layout.frames * int(layout.tokens_per_frame * self.retention))
        require_frames(layout.frames, self.c, self.segmentation)
        if self.segmentation == "fixed":
            segments, variant = fixed_segments(layout.frames, self.c), self.variant_for(layout.family)
            salient, anchors = frame_budgets(
                segments, layout.tokens_per_frame, self.retention, self.d, self.p, self.mode, variant
            )
            return float(sum(salient) + sum(anchors))
        return float(layout.frames * int(layout.tokens_per_frame * self.retention))


def kept_with_figures(tokens: VideoTokens, selection: FastVIDSelection, variant: str, **more) -> VideoTokens:
    """The selection's tokens in place of `tokens`, with the figures every record of a FastVID run carries."""
    return tokens.replaced(
        selection.tokens,
        selection.index,
        fastvid_variant=variant,
        fastvid_segments=len(selection.segments),
        fastvid_segment_sizes=[len(s) for s in selection.segments],
        **more,
        fastvid_salient=selection.salient,
        fastvid_anchors=selection.anchors,
        fastvid_tokens_out=int(selection.index.numel()),
    )
