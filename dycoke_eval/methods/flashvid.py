"""FlashVID (ICLR 2026): DySeg segments the video; per segment ADTS keeps diverse salient tokens and TSTM merges the
rest along temporal trees, then a spatial DPC-kNN merge; inside the LLM one FastV-style prune.

Released code: Fanziyang-v/FlashVID@1d37422c, `flashvid/utils.py` (U) and `flashvid/token_selection.py` (T). Defaults:
the scripts' (`scripts/llava_ov.sh`, `llava_vid.sh`, `qwen2_5_vl.sh`); `token_selection_method` and `min_segment_num`
differ by family there and are left to it (`null`: `RELEASED`). On V [F, N, D] video tokens and A [F, N] the attention
each receives in the encoder (`attention_received`, head and query mean): on LLaVA the pooled projected tokens and
SigLIP's feature layer, pooled like them; on Qwen2.5-VL (a frame is a temporal patch) the merger's tokens and the
ViT's last block, averaged over each merged token's 4 patches (`qwen_salience.mean_received_attention`):

* Budgets (U:46-48): per frame `ceil(N * retention_ratio * expansion)` tokens, `a = ceil(budget * alpha)` by ADTS and
  `s = budget - a` by TSTM.
* DySeg (U:168-226): cut after frame t where cos(mean V_t, mean V_t+1) < segment_threshold; with fewer than
  `min_segment_num` segments, the cut transitions' similarities are set to 1 (in place, so they are not cut twice)
  and the lowest remaining ones are cut too. A transition can still be cut twice (fewer frames than
  `min_segment_num`, a similarity rounded above 1): the empty segment between keeps nothing, as released.
* ADTS (T:28-130), per frame: distances `(1 - cos(x_i, x_j)) * A_j * 1e6` (column j scaled), `attn_div_v2` also
  times `mean_c <x_j, mean V_c>` over the segment's frames c (raw dot products); greedy max-min selection of `a`
  tokens from the column whose second-smallest distance is largest. `attn_div` never picks a token twice;
  `attn_div_v2` has no such guard (T:124-125) and can pick one again, which is then kept twice.
* TSTM (U:283-349), per segment of L > 1 frames, ADTS tokens excluded: each token's most cosine-similar token of the
  previous frame (in the features' dtype) is its parent when the similarity exceeds `temporal_threshold`; when fewer
  than `L * budget` tokens (ADTS ones included) would stay, the threshold rises to the (L N - L budget)-th largest
  similarity, floored at -1 + 1e-6 as compared in the features' dtype (the floor cannot bind: frame 0 and the ADTS
  tokens already stay); merged only strictly above it, so that token stays as well (L budget + 1 stay, absent
  ties). From the last frame back, a merged token adds
  its running sum into its parent and 1 to the parent's count; a kept one is divided by its count. A parent counts
  its direct children only, so a tree deeper than one level is divided by fewer than its members (the release's
  count quirk). The release sums in place into the pooled features; nothing reads them afterwards, so a copy here.
* Spatial merge (U:141-162): when the segment's tree roots exceed `s L`, each frame's roots become
  `ceil(n * s L / roots)` DPC-kNN clusters (k = min(clusters, 7), density noise `rand * 1e-6`), each the uniform
  mean of its members at its centre's grid position, centres by rank. A one-frame segment has no TSTM and clusters
  all its N tokens, its ADTS tokens included, which can then be kept twice (once selected, once as a centre).
* All tokens sorted by grid index (U:73-78) by an unstable argsort, as released (a token kept twice: either first).

`mode="official"` (the default) is the released arithmetic above. `mode="paper"` follows the paper (arXiv 2602.08024)
where it differs from the release and is unambiguous:
* TSTM's trees are their members' mean (Eq. 5, mean pooling; Alg. 1 lines 17-19): a merged token adds its subtree's
  count to its parent's (counts in float32), not 1; a chain a <- b <- c gives (a + b + c) / 3, not / 2.
* ADTS never picks a token twice, in both variants (Alg. 3 moves k from R to I; lines 11-12 look at R only): chosen
  columns score -inf (v2's distances can lie below the release's -1).
* `attn_div_v2`'s event relevance is the mean over the video's F frames (Eq. 8, `S_e = (1/F) sum_i (E_v f_v^T)_i`),
  not over the segment's.
* A one-frame segment clusters its N - a non-ADTS tokens (Alg. 1 line 5, R(f) = E(f) minus I(f)), so no token is
  kept twice.
* TSTM merges at `similarity >= temporal_threshold` (Alg. 1 line 12), the cosines in float32 (released: `>` in the
  features' dtype, where 0.8 is bf16 0.80078125).
As released in both modes, where the paper is ambiguous or silent: the per-frame budget `ceil(N R expansion)` and its
`ceil(. alpha)` split (App. C.3 budgets the whole video, Eqs. 13-15, and Alg. 3's per-frame M~ is undefined), so
the planned count is the same lower bound; DySeg; ADTS's first pick and column scaling; TSTM's raised threshold (not
in the paper; strict `>`); the spatial DPC-kNN (only named in Sec. 4.1); sums in the features' dtype; the in-LLM
prune. The `null` family settings resolve as released in both modes (the paper runs M_s = 8 and both calibrations,
Eq. 9, on every family: set min_segment_num 8 and token_selection_method attn_div_v2 for that).

Layouts (`flashvid/llava_arch.py`): LLaVA-OneVision: the tokens then one newline, positions contiguous. LLaVA-Video as
the scripts run it (`mm_newline_position=frame`): each frame's tokens, then one newline (`frame_newlines=1`).
Qwen2.5-VL (`modeling_qwen2_5_vl.py:462-505`): each token at its grid position's M-RoPE ids; a token kept twice
enters once, as the last copy (`once_per_position`: the release writes both copies to one position and reads the
last one twice).

In-LLM (U:352-406, `modeling_qwen2.py:85-107`): at layer `pruning_layer`, scored by layer `pruning_layer - 1`'s last
query (head mean), prefill keeps the top `ceil(V' * llm_retention_ratio)` of the V' tokens of the release's visual
span, which is the pre-LLM tokens on LLaVA-OneVision (the newline lies after it and always stays) and Qwen2.5-VL, and the
tokens with their frame newlines on LLaVA-Video. Kept tokens keep their positions. Qwen3-VL is refused: the harness's
in-LLM stages cannot yet run there (its timestamps split the video's tokens).

Where this differs from the release: its unseeded density noise is drawn per sample from `per_sample_seed(seed,
sample)`; on LLaVA the encoder attention, and on every family the in-LLM score, are float32 (the release rounds both
to the model dtype, bf16, before their means; Qwen2.5-VL's encoder attention here rounds as released); torch.topk's
and argmax's tie order is the device's, as released.

On an accelerator: the host reads the F-1 transition similarities (DySeg's cut count decides the topk), then once the
TSTM counts of every frame (on Qwen2.5-VL once more, the distinct positions). ADTS's greedy selection is one step per
selected token over all frames of a segment, TSTM's merge one step per frame (each frame's sums feed the previous
frame's: the release's rounding order) and the spatial merge one DPC-kNN per frame, as released: loops over segments,
frames and steps of a few small kernels each. Paper mode reads nothing more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dycoke_eval.compression.stages import (
    CompressionMethod,
    ModelInfo,
    PlannedCounts,
    PrefillStage,
    PreLLMStage,
    Stage,
    VideoTokens,
    per_sample_seed,
)
from dycoke_eval.config import ConfigError
from dycoke_eval.geometry import LLAVA_FAMILIES
from dycoke_eval.methods.kv_selection import top_visual_tokens
from dycoke_eval.methods.padded import true_first
from dycoke_eval.methods.stprune import transition_similarity

MODES = ("official", "paper")  # the release's arithmetic | the paper's where they differ (module docstring)
SELECTIONS = ("attn_div", "attn_div_v2")  # ADTS v1 (Qwen scripts) | v2 (LLaVA scripts)
ATTENTION_SCALE = 1e6  # the release scales the attention "to avoid numerical issues" (T:46, T:97)
MAX_NEIGHBOURS = 7  # DPC-kNN's k = min(clusters, 7) (U:155)
DENSITY_NOISE = 1e-6  # the release's density tie-break noise, rand * 1e-6 (U:255)
SOFT_FLOOR = -1.0 + 1e-6  # the raised TSTM threshold's floor (U:310)
QWEN = "qwen2_5_vl"
RELEASED = {  # the scripts' per-family settings (scripts/llava_ov.sh, llava_vid.sh, qwen2_5_vl.sh), for `null`
    **{family: {"token_selection_method": "attn_div_v2", "min_segment_num": 8} for family in LLAVA_FAMILIES},
    QWEN: {"token_selection_method": "attn_div", "min_segment_num": 4},
}


def frame_budgets(tokens_per_frame: int, retention_ratio: float, expansion: float, alpha: float) -> tuple[int, int]:
    """Per frame (ADTS tokens, TSTM tokens): `ceil(N R e)` split `ceil(. alpha)` and the rest (U:46-48)."""
    budget = math.ceil(tokens_per_frame * retention_ratio * expansion)
    adts = math.ceil(budget * alpha)
    return adts, budget - adts


def dyseg_lengths(similarity: torch.Tensor, threshold: float, min_segments: int) -> list[int]:
    """[F-1] transition similarities -> frames per segment (U:185-226): cuts below `threshold`, then, with fewer than
    `min_segments` segments, the lowest uncut transitions (the cut ones set to 1 first) until there are enough.

    A transition can still be cut twice, making an empty segment, as released: when more cuts are wanted than uncut
    transitions remain (fewer frames than `min_segments`), or when an uncut similarity rounds above 1."""
    frames = similarity.numel() + 1
    cuts = torch.where(similarity < threshold)[0]
    missing = min_segments - (cuts.numel() + 1)
    if missing > 0:
        lifted = torch.where(similarity < threshold, 1.0, similarity)
        extra = torch.topk(lifted, k=min(missing, lifted.shape[0]), largest=False).indices
        cuts = torch.cat([cuts, extra]).sort().values
    ends = torch.cat([cuts.new_tensor([-1]), cuts, cuts.new_tensor([frames - 1])])
    return torch.diff(ends).tolist()


def adts_distances(
    features: torch.Tensor, attention: torch.Tensor, method: str, frame_means: torch.Tensor | None = None
) -> torch.Tensor:
    """[L, N, D] a segment's frames, [L, N] attention -> [L, N, N] float32 ADTS distances: `1 - cos` with column j
    scaled by A_j * 1e6, and for `attn_div_v2` by j's mean raw dot product with the frame means `frame_means` [C, D]
    (T:43-51, T:94-107): the segment's own frames when None, as released; the video's F frames in paper mode (Eq. 8)."""
    x = features.float()
    unit = x / x.norm(p=2, dim=-1, keepdim=True)
    distance = 1.0 - torch.bmm(unit, unit.transpose(-1, -2))
    scaled = distance * (attention.float() * ATTENTION_SCALE).unsqueeze(1)
    if method == "attn_div":
        return scaled
    means = x.mean(1) if frame_means is None else frame_means
    relevance = torch.einsum("b n d, c d -> b c n", x, means).mean(1)
    return scaled * relevance.unsqueeze(1)


def max_min_selection(distances: torch.Tensor, count: int, exclude_chosen: bool, chosen_score: float = -1.0) -> torch.Tensor:
    """[B, N, N] distances -> [B, count] chosen columns, ascending (T:56-73, T:112-127).

    First the column whose second-smallest distance is largest; then each step the column farthest (max over columns
    of the min over the chosen rows) from the chosen ones; `exclude_chosen` scores chosen columns `chosen_score`: -1
    is v1's guard (T:70), enough for v1's distances (>= 0, up to rounding); paper mode passes -inf, since v2's can lie
    below -1 (a negative event relevance) and Alg. 3 picks from the unchosen ones only.
    The min over the chosen rows is kept as it grows, one row a step: the same values as the release's recomputed min.
    """
    pick = distances.topk(2, dim=1, largest=False).values[:, 1, :].argmax(dim=-1)
    chosen = [pick]
    nearest = _rows_of(distances, pick)
    taken = torch.zeros_like(nearest, dtype=torch.bool)
    for _ in range(1, count):
        taken = taken.scatter(1, pick[:, None], True)
        pick = (nearest.masked_fill(taken, chosen_score) if exclude_chosen else nearest).argmax(dim=-1)
        chosen.append(pick)
        nearest = torch.minimum(nearest, _rows_of(distances, pick))
    return torch.stack(chosen, dim=1).sort(dim=-1).values


def _rows_of(distances: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[B, N, N], [B] -> [B, N] row rows[b] of each matrix."""
    return distances.gather(1, rows[:, None, None].expand(-1, 1, distances.shape[-1])).squeeze(1)


@dataclass
class TemporalLinks:
    """A segment's TSTM decisions: which tokens merge into their parent in the previous frame, and the parents."""

    merged: torch.Tensor  # [L, N] bool; never in frame 0
    parent: torch.Tensor  # [L, N] the parent's index in the previous frame (-1 in frame 0)
    raised: torch.Tensor  # [] bool: whether the threshold was raised (too many tokens would merge)


def temporal_links(
    features: torch.Tensor, free: torch.Tensor, threshold: float, lower_bound: int, paper: bool = False
) -> TemporalLinks:
    """[L, N, D] a segment's frames, [L, N] True where not an ADTS token -> TSTM's links (U:289-312), on the device.

    Each token's best cosine match in the previous frame, ADTS tokens masked to -1 on both sides; merged when above
    `threshold`, or when fewer than `lower_bound` tokens would stay, above the (L N - lower_bound)-th largest
    similarity floored at -1 + 1e-6 (`max(soft, -1 + 1e-6)`, compared in the features' dtype as released).
    `paper`: the cosines in float32, merged at `>= threshold` (Alg. 1 line 12), ADTS tokens and frame 0 masked to
    -inf (so that `>=` at threshold -1 cannot merge them); the raised threshold as released (strict `>`)."""
    frames, tokens, _ = features.shape
    x, fill = (features.float(), -math.inf) if paper else (features, -1.0)
    unit = x / x.norm(p=2, dim=-1, keepdim=True)
    similarity = torch.einsum("b n d, b m d -> b n m", unit[1:], unit[:-1])
    similarity = similarity.masked_fill(~free[1:, :, None], fill).masked_fill(~free[:-1, None, :], fill)
    best, parent = similarity.max(dim=-1)
    best = F.pad(best, (0, 0, 1, 0), value=fill)
    parent = F.pad(parent, (0, 0, 1, 0), value=-1)
    merged = best >= threshold if paper else best > threshold
    raised = (~merged).int().sum() < lower_bound
    soft = best.view(-1).topk(k=frames * tokens - lower_bound).values[-1]
    soft = torch.maximum(soft, torch.tensor(SOFT_FLOOR, dtype=best.dtype, device=best.device))
    return TemporalLinks(torch.where(raised, best > soft, merged), parent, raised)


def tree_merge(features: torch.Tensor, links: TemporalLinks, merged_counts: list[int], tree_mean: bool = False) -> torch.Tensor:
    """[L, N, D] -> each token's TSTM value (U:314-337): from the last frame back, kept tokens are divided by their
    count, merged ones added into their parent (one-hot product in the features' dtype) and counted 1 each: a root
    is its tree's sum over 1 + its direct children. `tree_mean` (paper mode, Eq. 5's mean pooling): a merged token
    adds its whole count (its subtree's members, counted in float32), so a root is its tree's mean.

    `merged_counts` [L]: merged tokens per frame, read on the host, so each frame's merged rows are sliced without a
    host read (the release's boolean index). Only the roots' values are meaningful."""
    sums, tokens = features.clone(), features.shape[1]
    counts = torch.ones(features.shape[:2], dtype=torch.float32 if tree_mean else features.dtype, device=features.device)
    merged_first = true_first(links.merged)
    for frame in range(features.shape[0] - 1, -1, -1):
        stays = ~links.merged[frame, :, None]
        sums[frame] = torch.where(stays, sums[frame] / counts[frame, :, None], sums[frame])
        if merged_counts[frame]:
            rows = merged_first[frame, : merged_counts[frame]]
            onehot = F.one_hot(links.parent[frame, rows], num_classes=tokens).to(features.dtype)
            sums[frame - 1] += torch.einsum("m n, m d -> n d", onehot, sums[frame, rows])
            if tree_mean:
                counts[frame - 1] += torch.einsum("m n, m -> n", onehot.to(counts.dtype), counts[frame, rows])
            else:
                counts[frame - 1] += onehot.sum(dim=0)
    return sums


def density_peak_clusters(
    points: torch.Tensor, clusters: int, k: int, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, D] points -> cluster of each point [n] and centres [clusters] by rank: FlashVID's `dpc_knn` (U:229-280).

    The DPC-kNN of `density_peaks.dpc_knn`, but as this release computes it: centres by `topk` (its tie order), and
    each point goes to the centre at the least `dist[point, centre]` (cdist through a matrix product is not exactly
    symmetric, and `density_peaks` reads `dist[centre, point]`)."""
    x = points.float()
    distance = torch.cdist(x, x) / math.sqrt(x.shape[-1])
    nearest = distance.topk(k, dim=-1, largest=False).values
    density = torch.mean(-(nearest**2), dim=-1).exp()
    if noise is not None:
        density = density + noise
    denser = density[None, :] > density[:, None]
    delta = torch.where(denser, distance, distance.max()).min(dim=-1).values
    centres = (delta * density).topk(clusters).indices
    labels = distance[:, centres].argmin(dim=-1)
    labels[centres] = torch.arange(clusters, device=labels.device)
    return labels, centres


def cluster_means(points: torch.Tensor, labels: torch.Tensor, clusters: int) -> torch.Tensor:
    """[n, D] points, [n] labels -> [clusters, D] uniform means in the points' dtype (U:157-159)."""
    onehot = F.one_hot(labels, num_classes=clusters).to(points.dtype)
    return torch.einsum("n c, n d -> c d", onehot, points) / onehot.sum(dim=0).unsqueeze(-1)


@dataclass
class FlashVIDTokens:
    """What the pre-LLM stage leaves: tokens [M, D] at grid positions [M] ascending, and per-video figures."""

    features: torch.Tensor
    index: torch.Tensor
    segments: list[int]
    roots: int  # TSTM's tree roots (ADTS tokens excluded; a one-frame segment's N tokens), before the spatial merge
    raised: int  # segments whose TSTM threshold was raised


def flashvid_compress(
    video: torch.Tensor,
    attention: torch.Tensor,
    *,
    retention_ratio: float,
    alpha: float,
    token_selection_method: str,
    temporal_threshold: float,
    segment_threshold: float,
    min_segment_num: int,
    expansion: float,
    generator: torch.Generator | None = None,
    density_noise: float = DENSITY_NOISE,
    mode: str = "official",
) -> FlashVIDTokens:
    """V [F, N, D], A [F, N] -> FlashVID's pre-LLM tokens (`flashvid_compression`, U:23-78); `generator` draws the
    density noise (default: the global RNG), `density_noise=0` draws none; `mode` official | paper (module docstring)."""
    paper = mode == "paper"
    frames, tokens, dim = video.shape
    adts, tstm = frame_budgets(tokens, retention_ratio, expansion, alpha)
    segments = dyseg_lengths(transition_similarity(video.mean(1)).cpu(), segment_threshold, min_segment_num)
    starts = [sum(segments[:i]) for i in range(len(segments))]
    spans = [(start, length) for start, length in zip(starts, segments, strict=True) if length]  # an empty one keeps none
    grid_index = torch.arange(frames * tokens, device=video.device).view(frames, tokens)
    video_means = video.float().mean(1) if paper and token_selection_method == "attn_div_v2" else None  # Eq. 8's F
    distances = [
        adts_distances(video[start : start + length], attention[start : start + length], token_selection_method, video_means)
        for start, length in spans
    ]  # per segment (v2's event relevance: the segment's, or the video's in paper mode), then one greedy selection
    chosen_all = max_min_selection(
        torch.cat(distances),
        adts,
        exclude_chosen=paper or token_selection_method == "attn_div",
        chosen_score=-math.inf if paper else -1.0,
    )
    selected = chosen_all.split([length for _, length in spans])
    links = []
    for (start, length), chosen in zip(spans, selected, strict=True):
        if tstm and length > 1:
            free = torch.ones(length, tokens, dtype=torch.bool, device=video.device).scatter(1, chosen, False)
            bound = (adts + tstm) * length
            links.append((free, temporal_links(video[start : start + length], free, temporal_threshold, bound, paper)))
    counts = _read_counts([(link.merged.sum(dim=1), (~link.merged & free).sum(dim=1), link.raised) for free, link in links])
    out_features, out_index, roots_total = [], [], 0
    linked = iter(zip(links, counts, strict=True))
    for (start, length), chosen in zip(spans, selected, strict=True):
        part, part_index = video[start : start + length], grid_index[start : start + length]
        out_features.append(part.gather(1, chosen[..., None].expand(-1, -1, dim)).view(-1, dim))
        out_index.append(part_index.gather(1, chosen).view(-1))
        if not tstm:
            continue
        if length > 1:
            (free, link), (merged_counts, root_counts, _) = next(linked)
            values = tree_merge(part, link, merged_counts, tree_mean=paper)
            roots = true_first((~link.merged & free).flatten(), sum(root_counts))
            pools = zip(
                values.view(-1, dim)[roots].split(root_counts), part_index.view(-1)[roots].split(root_counts), strict=True
            )
        else:  # one frame, no TSTM: released, all N tokens are clustered; paper (Alg. 1 line 5), the N - a non-ADTS ones
            pool, pool_index = part[0], part_index[0]
            if paper:
                rest = true_first(torch.ones_like(pool_index, dtype=torch.bool).scatter(0, chosen[0], False), tokens - adts)
                pool, pool_index = pool[rest], pool_index[rest]
            root_counts, pools = [pool_index.numel()], [(pool, pool_index)]
        roots_total += sum(root_counts)
        ratio = tstm * length / sum(root_counts)
        for (pool, pool_index), size in zip(pools, root_counts, strict=True):
            clusters = math.ceil(size * ratio)
            if clusters > 0 and ratio < 1.0:
                noise = _noise(size, density_noise, generator, video.device)
                labels, centres = density_peak_clusters(pool, clusters, min(clusters, MAX_NEIGHBOURS), noise)
                pool, pool_index = cluster_means(pool, labels, clusters), pool_index[centres]
            out_features.append(pool)
            out_index.append(pool_index)
    index = torch.cat(out_index)
    order = index.argsort()  # not stable, as released: a token kept twice comes in the device's order
    raised = sum(int(flag) for _, _, flag in counts)
    return FlashVIDTokens(torch.cat(out_features)[order], index[order], segments, roots_total, raised)


def _read_counts(per_segment: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> list[tuple[list, list, bool]]:
    """Every segment's per-frame merged and root counts and its raised flag, in one host read."""
    if not per_segment:
        return []
    flat = torch.cat([torch.cat([merged, roots, raised.view(1).long()]) for merged, roots, raised in per_segment])
    values, out, at = flat.tolist(), [], 0
    for merged, _, _ in per_segment:
        length = merged.numel()
        out.append((values[at : at + length], values[at + length : at + 2 * length], bool(values[at + 2 * length])))
        at += 2 * length + 1
    return out


def _noise(size: int, scale: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor | None:
    """The density tie-break noise of one DPC-kNN call, `rand(size) * scale` (the release's `rand_like * 1e-6`)."""
    if not scale:
        return None
    draw_device = generator.device if generator is not None else device
    return (torch.rand(size, generator=generator, device=draw_device) * scale).to(device)


@dataclass
class FlashVIDCompression(PreLLMStage):
    """FlashVID's vision-side compression (module docstring), on the families of `RELEASED`."""

    retention_ratio: float = 0.25
    alpha: float = 0.7
    token_selection_method: str | None = None  # None: the family's released one (RELEASED)
    temporal_threshold: float = 0.8
    segment_threshold: float = 0.9
    min_segment_num: int | None = None  # None: the family's released one (RELEASED)
    expansion: float = 1.25
    mode: str = "official"  # official | paper (module docstring)
    seed: int = 0
    name: str = "flashvid"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r}; use one of {', '.join(MODES)}")
        if not 0 < self.retention_ratio * self.expansion < 1:
            raise ConfigError(
                f"retention_ratio={self.retention_ratio}, expansion={self.expansion}: a frame's budget N * retention_ratio * "
                "expansion must be a share of its tokens in (0, 1) (TSTM raises its threshold to leave the rest)"
            )
        if not 0 < self.alpha <= 1:
            raise ConfigError(f"alpha={self.alpha}: ADTS's share of each frame's budget lies in (0, 1]")
        if self.token_selection_method not in (None, *SELECTIONS):
            raise ConfigError(f"token_selection_method={self.token_selection_method!r}: choose one of {', '.join(SELECTIONS)}")
        if not -1 <= self.temporal_threshold < 1:
            raise ConfigError(
                f"temporal_threshold={self.temporal_threshold}: a cosine threshold in [-1, 1) (at 1 the release merges "
                "nothing and divides by zero)"
            )
        if not -1 <= self.segment_threshold <= 1:
            raise ConfigError(f"segment_threshold={self.segment_threshold}: a cosine threshold lies in [-1, 1]")
        if self.min_segment_num is not None and self.min_segment_num < 1:
            raise ConfigError(f"min_segment_num={self.min_segment_num}: a video has at least 1 segment")

    def needs(self) -> frozenset[str]:
        return frozenset({"attention_received"})

    def check(self, model: ModelInfo) -> None:
        if model.family not in RELEASED:
            raise ConfigError(
                f"{self.name}: this harness runs FlashVID's released arithmetic on {', '.join(RELEASED)}, not on the "
                f"{model.family!r} model family, where the harness's in-LLM stages cannot run yet; choose a method acting "
                "before the LLM there (random, pooling)"
            )
        super().check(model)

    def resolved(self, family: str) -> dict[str, Any]:
        """The settings left to the family (None) as its release sets them, the others as given."""
        released = RELEASED[family]
        return {key: released[key] if getattr(self, key) is None else getattr(self, key) for key in released}

    def select(self, tokens: VideoTokens, signals: dict[str, torch.Tensor], sample: str) -> VideoTokens:
        grid, family = tokens.grid(), tokens.layout.family
        generator = torch.Generator(grid.device).manual_seed(per_sample_seed(self.seed, sample))
        kept = flashvid_compress(
            grid,
            signals["attention_received"],
            retention_ratio=self.retention_ratio,
            alpha=self.alpha,
            temporal_threshold=self.temporal_threshold,
            segment_threshold=self.segment_threshold,
            expansion=self.expansion,
            generator=generator,
            mode=self.mode,
            **self.resolved(family),
        )
        features, index = (kept.features, kept.index) if family != QWEN else once_per_position(kept.features, kept.index)
        count = int(index.numel())
        newlines = 1 if family == "llava_video" else None  # the scripts' mm_newline_position=frame
        adts, tstm = frame_budgets(tokens.tokens_per_frame, self.retention_ratio, self.expansion, self.alpha)
        return tokens.replaced(
            features,
            index,
            frame_newlines=newlines,
            flashvid_segments=len(kept.segments),
            flashvid_segment_sizes=kept.segments,
            flashvid_adts_per_frame=adts,
            flashvid_tstm_per_frame=tstm,
            flashvid_tstm_roots=kept.roots,
            flashvid_raised_segments=kept.raised,
            flashvid_tokens_out=count,
            flashvid_llm_span=count + (tokens.frames * newlines if newlines else 0),
        )

    def planned_tokens(self, counts: PlannedCounts) -> float:
        """F * budget, a lower bound: each frame's `ceil` of its share of the spatial clusters can add one token, and
        a one-frame segment's `ceil(n * s / n)` can round above s (the count depends on the video); in both modes."""
        layout = counts.layout
        adts, tstm = frame_budgets(layout.tokens_per_frame, self.retention_ratio, self.expansion, self.alpha)
        return float(layout.frames * (adts + tstm))


@dataclass
class FlashVIDPrune(PrefillStage):
    """FlashVID's in-LLM prune: from `layer` on, prefill keeps the top `ceil(V' * ratio)` of the release's visual span
    (`fastv_prune`, U:352-406), scored by layer `layer - 1`'s last query; positions are kept."""

    layer: int = 20
    ratio: float = 0.3
    name: str = "flashvid_llm"
    layer_setting = "pruning_layer"

    def __post_init__(self) -> None:
        if not 0 < self.ratio <= 1:
            raise ConfigError(f"llm_retention_ratio={self.ratio}: the in-LLM prune keeps a share of the tokens in (0, 1]")
        if self.layer < 1:
            raise ConfigError(f"pruning_layer={self.layer}: it is scored at pruning_layer - 1, so choose pruning_layer >= 1")

    def keep(self, visual_attention: torch.Tensor, pre_llm: dict[str, Any]) -> torch.Tensor:
        """The top ceil(V' ratio) of the first V' visual tokens, ascending, and every token after them (the newline
        LLaVA-OneVision appends after the release's span)."""
        if "flashvid_llm_span" not in pre_llm:
            raise ConfigError(f"{self.name} prunes FlashVID's visual span; it needs the flashvid pre-LLM stage before it")
        span, present = pre_llm["flashvid_llm_span"], visual_attention.numel()
        if not span <= present <= span + 1:
            raise ConfigError(
                f"{self.name}: the visual span holds {present} tokens for FlashVID's {span}; it needs the layout the "
                "flashvid pre-LLM stage asked for"
            )
        kept = top_visual_tokens(visual_attention[:span], flashvid_keep_count(span, self.ratio))
        return torch.cat([kept, torch.arange(span, present, device=kept.device)])

    def plan(self, counts: PlannedCounts) -> PlannedCounts:
        """Layers before `layer` see every token, in prefill and in decoding (their cache holds them all); from `layer`
        on, ceil(n * ratio) (on LLaVA-Video an estimate: its span holds the frame newlines too)."""

        def pruned(per_layer: list[float]) -> list[float]:
            return per_layer[: self.layer] + [float(flashvid_keep_count(round(n), self.ratio)) for n in per_layer[self.layer :]]

        return counts.with_layers(pruned(counts.prefill), pruned(counts.decode))


def once_per_position(features: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted tokens [M, D] at grid positions [M] -> the last copy of each position's tokens. The release scatters the
    tokens into the Qwen-VL prompt at their positions in this order, so the last copy of a token kept twice is the one
    written (on the CPU; a GPU scatter keeps either), and gathers it twice; the adapter needs distinct positions, so it
    enters once here. One host read (the count)."""
    last = torch.ones_like(index, dtype=torch.bool)
    last[:-1] = index[1:] != index[:-1]
    return features[last], index[last]


def flashvid_keep_count(span: int, ratio: float) -> int:
    """`ceil(V' * llm_retention_ratio)` (U:370)."""
    return math.ceil(span * ratio)


@dataclass
class FlashVID(CompressionMethod):
    retention_ratio: float = 0.25  # R: the average share kept; a frame keeps ceil(N R expansion) before the LLM
    alpha: float = 0.7  # ADTS's share of a frame's budget
    token_selection_method: str | None = None  # attn_div_v2 | attn_div; None: the family's (v2 LLaVA, v1 Qwen2.5-VL)
    temporal_threshold: float = 0.8  # TSTM merges a token into its parent above this cosine
    segment_threshold: float = 0.9  # DySeg cuts below this transition cosine
    min_segment_num: int | None = None  # DySeg makes at least this many segments; None: the family's (8 LLaVA, 4 Qwen)
    expansion: float = 1.25  # the vision side keeps expansion * R, the LLM prune brings it back
    pruning_layer: int = 20  # the first LLM layer that sees the pruned tokens (scored at pruning_layer - 1)
    llm_retention_ratio: float = 0.3  # share of the visual span kept from pruning_layer on
    mode: str = "official"  # official: the release's arithmetic | paper: the paper's where they differ (module docstring)
    seed: int = 0  # of the DPC-kNN density noise (unseeded in the release), combined with the sample's name
    name: str = "flashvid"

    def __post_init__(self) -> None:
        self.stages()  # the stages check their settings now, at configuration time

    def stages(self) -> list[Stage]:
        return [
            FlashVIDCompression(
                retention_ratio=self.retention_ratio,
                alpha=self.alpha,
                token_selection_method=self.token_selection_method,
                temporal_threshold=self.temporal_threshold,
                segment_threshold=self.segment_threshold,
                min_segment_num=self.min_segment_num,
                expansion=self.expansion,
                mode=self.mode,
                seed=self.seed,
            ),
            FlashVIDPrune(layer=self.pruning_layer, ratio=self.llm_retention_ratio),
        ]

    def describe(self, family: str | None = None) -> dict[str, Any]:
        """On a family FlashVID was released for, the settings left to it (null) as they run there."""
        settings = super().describe(family)
        if family in RELEASED:
            settings.update(self.stages()[0].resolved(family))
        return settings
