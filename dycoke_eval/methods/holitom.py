"""HoliTom (NeurIPS'25): holistic token merging before the LLM, and its in-LLM merge "M".

Released code: `cokeshao/HoliTom@e9b2972f` (`holitom/llava_arch.py` before the LLM, `holitom/modeling_qwen2.py` the
merge M), LLaVA-OneVision and LLaVA-Video only. Before the LLM, on the pooled projected features [F, N, D] and the
pooled SigLIP attention each token receives (`attention_received`: the feature layer's softmax, head and query mean):

1. Consecutive frames' per-position cosine (`normalize`, then `cosine_similarity`, in the features' dtype).
2. Static windows by dynamic programming (`select_static_windows`): window [s, e] saves (e - s) tokens per position
   whose similarity stays above `tau` on every pair of the window; the DP picks the windows saving most (a strict `>`,
   so ties keep single frames), windows at most `max_window_size` frames long.
3. The budget is re-scaled so that, once each static position keeps one copy, `retention` of the F*N tokens remain:
   r = min(retention / ((F*N - saved) / (F*N)), 1).
4. Per window: static positions (above `tau` on all the window's pairs) are averaged over the window's frames, then
   merged by DPC-kNN into round(S * r) tokens; each frame keeps ceil(n * r) of its n dynamic tokens, the
   round(ceil(n * r) * (1 - d)) most attended in grid order, plus (d > 0) DPC-kNN merges of the rest.
5. A DPC-kNN merge: centres are the top density-peak scores (Euclidean distances over sqrt(D) in float32, density from
   the k = min(`k`, clusters) nearest, itself included), sorted by index; every other token joins its nearest centre,
   and a centre with members becomes `beta * centre + (1 - beta) * mean(members)`.
6. Order: per window [static, frame 0 dynamic, frame 1 dynamic, ...], one newline after the video (LLaVA-OneVision);
   LLaVA-Video's rule (`add_newline_token`: each frame's tokens, the static ones in the window's first frame, in grid
   order, a newline after every row that keeps a token) is the adapter's own row-end layout for these grid indices.
   Positions are consecutive.

The merge M (`in_llm`): at layer `merge_layer - 1` of prefill the last token's head-mean attention over the visual
tokens (newlines included) keeps the round(V * (1 - merge_ratio)) most attended; each other one is merged into the kept
token its hidden state (entering `merge_layer`) is most cosine-similar to, and from `merge_layer` on only the kept
tokens remain, with their positions.

Quirks of the release, reproduced:
* `tau` is compared in the features' dtype: in bfloat16 0.8 acts as 0.80078125 and 0.65 as 0.6484375.
* The static merge counts round(S * r) (half to even; a window's static tokens vanish when it rounds to 0), the
  dynamic ones ceil(n * r); the density's neighbours are min(k, clusters), not min(k, tokens).
* `NO_BETA`: the merge reads `os.environ.get("NO_BETA", "0") == "0"` while the settings line prints the other default
  ("1"); the released scripts set neither, so the beta-weighted merge runs (`beta` = 0.6).
* The density's tie-breaking noise `torch.rand(...) * 1e-6` is unseeded; here it is drawn per sample from `seed`
  (`per_sample_seed`), in the released order (per window its dynamic merges, then its static merge).
* M halves sequentially: dropped tokens in index order each do `h[dst] = (h[dst] + h[src]) / 2`, so a kept token's
  own state and its earlier merges are halved at every later one (not a mean).
* M sets `cache_position` to its first n entries rather than the kept ones; under sdpa with a dynamic cache (batch 1,
  no padding) nothing reads it (the cache appends, the rotary uses `position_ids`), so no number changes.

Not reproduced: M asks layer `merge_layer - 1` for its attention weights (`output_attentions=True`), and under sdpa the
transformers releases its code was written for (4.50-4.52: `_update_causal_mask` inside the model) compute that layer
with eager attention and the model-level mask, which is None for an unpadded prompt: in the release that one layer
attends without a causal mask in prefill (the last token's scores are the same; every other token's state differs).
Here it stays causal.

Where this differs: with `d > 0` the release stops (`pos.masked_select(mask.unsqueeze(-1))` broadcasts the positions
to [W, n, n] and its `view` fails); here the contextual tokens take their centres' positions, as the code intends.
The attention signal is computed in float32 (the release averages bfloat16 probabilities), and M's scores come from
the harness's float32 last-query softmax: the selections can differ from a bfloat16 run's where scores tie to the last
bit. Windows are handled one after another (at most one per frame, a handful on most videos); the host reads the
windows' savings once and the static counts once per video; each DPC-kNN merge reads its clusters' sizes (clusters of
one size are summed at once, as `mean` sums that many rows), and M runs one round per member of its largest group (one
host read of that size): both in the release's order, bit for bit on the CPU (CUDA's `mean` multiplies by 1/n where
the CPU divides by n).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from dycoke_eval.compression.stages import (
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

DENSITY_NOISE = 1e-6  # amplitude of the released density tie-break, `torch.rand(...) * 1e-6`


def frame_similarity(grid: torch.Tensor) -> torch.Tensor:
    """[F, N, D] -> [F-1, N] cosine of each position between consecutive frames, of the normalised features (as
    released: `normalize` then `cosine_similarity`, in the features' dtype)."""
    unit = F.normalize(grid, p=2, dim=-1)
    return F.cosine_similarity(unit[:-1], unit[1:], dim=-1)


def _unstable_before(similarity: torch.Tensor, tau: float) -> torch.Tensor:
    """[F-1, N] -> [F, N]: per position, how many of the pairs before frame e fall to `tau` or below."""
    return F.pad((~(similarity > tau)).long().cumsum(0), (0, 0, 1, 0))


def static_window_savings(similarity: torch.Tensor, tau: float) -> torch.Tensor:
    """[F-1, N] -> [F, F] float32: window [s, e] saves (e - s) tokens for each position above `tau` on all its pairs
    (`pruned_static_count`; 0 for e <= s)."""
    before = _unstable_before(similarity, tau)
    stable = (before[None, :, :] == before[:, None, :]).sum(dim=-1)
    frames = torch.arange(before.shape[0], device=similarity.device)
    return (stable * (frames[None, :] - frames[:, None]).clamp(min=0)).float()


def select_static_windows(savings: list[list[float]], max_window_size: int) -> tuple[list[tuple[int, int]], float]:
    """The released DP over frames: the windows (first, last frame) covering the video that save most tokens, and how
    many they save. A strict `>` keeps the earlier (shorter) choice on ties."""
    frames = len(savings)
    best, first = [0.0] * frames, [0] * frames
    for last in range(frames):
        value, start = (best[last - 1] if last > 0 else 0.0), last
        for size in range(2, min(last + 1, max_window_size) + 1):
            before = last - size
            candidate = (best[before] if before >= 0 else 0.0) + savings[before + 1][last]
            if candidate > value:
                value, start = candidate, before + 1
        best[last], first[last] = value, start
    windows, last = [], frames - 1
    while last >= 0:
        windows.append((first[last], last))
        last = first[last] - 1
    return windows[::-1], best[-1]


def rescaled_retention(retention: float, tokens: int, saved: float) -> float:
    """The share each window keeps so that `retention` of the `tokens` remain once `saved` static copies are gone."""
    return min(retention / ((tokens - saved) / tokens), 1)


def static_positions(similarity: torch.Tensor, windows: list[tuple[int, int]], tau: float) -> torch.Tensor:
    """[F-1, N] -> [K, N]: positions above `tau` on every pair of each window (none in a one-frame window)."""
    before = _unstable_before(similarity, tau)
    first, last = torch.tensor(windows, device=similarity.device).unbind(1)
    return (before[last] == before[first]) & (last > first)[:, None]


def density_peak_centres(
    points: torch.Tensor, clusters: int, neighbours: int, noise: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`cluster_dpc_knn`: [B, n, D] -> the centres [B, clusters] (score order) and the distances [B, n, n] (float32,
    over sqrt(D)); `noise` [B, n] is added to the density."""
    distance = torch.cdist(points.float(), points.float()) / (points.shape[-1] ** 0.5)
    nearest = distance.topk(neighbours, dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()
    if noise is not None:
        density = density + noise
    denser = density[:, None, :] > density[:, :, None]
    farthest = distance.flatten(1).max(dim=-1).values[:, None, None]
    to_denser = torch.where(denser, distance, farthest).min(dim=-1).values
    return (to_denser * density).topk(clusters, dim=-1).indices, distance


def _complement(chosen: torch.Tensor, size: int) -> torch.Tensor:
    """[B, c] distinct indices into `size` -> [B, size - c] the others, ascending (no host read)."""
    taken = torch.zeros(chosen.shape[0], size, dtype=torch.int8, device=chosen.device).scatter(1, chosen, 1)
    return taken.argsort(dim=1, stable=True)[:, : size - chosen.shape[1]]


def _gather_rows(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[B, n, D] rows at [B, m] -> [B, m, D]."""
    return values.gather(1, index[..., None].expand(-1, -1, values.shape[-1]))


def beta_merge(points: torch.Tensor, centres: torch.Tensor, distance: torch.Tensor, beta: float) -> torch.Tensor:
    """`merge_tokens_by_clustering` (NO_BETA unset): [B, n, D] points, [B, c] centres (ascending), [B, n, n] distances
    -> [B, c, D]: each centre with members becomes beta * centre + (1 - beta) * their mean, one without stays.

    Members join the nearest centre (the first on ties). `mean` adds in an order that depends on how many rows it
    adds, so the clusters are summed by size, all clusters of one size at once (the host reads the sizes)."""
    batch, size, dim = points.shape
    clusters = centres.shape[1]
    members = _complement(centres, size)
    to_centres = distance.gather(1, members[..., None].expand(-1, -1, size)).gather(
        2, centres[:, None, :].expand(-1, members.shape[1], -1)
    )
    label = to_centres.argmin(dim=-1)  # [B, m]: the cluster (rank among the centres) each member joins
    order = label.argsort(dim=1, stable=True)  # members grouped by cluster, index order within
    grouped = _gather_rows(points, members.gather(1, order)).flatten(0, 1)  # [B * m, D], cluster after cluster
    counts = torch.zeros(batch, clusters, dtype=torch.long, device=points.device)
    counts = counts.scatter_add(1, label, torch.ones_like(label)).flatten()  # [B * c]
    first = counts.cumsum(0) - counts  # where each cluster starts in `grouped`
    accumulate = torch.float64 if points.dtype == torch.float64 else torch.float32  # `mean`'s CPU accumulation
    total = torch.zeros(batch * clusters, dim, dtype=accumulate, device=points.device)
    for members_count in counts.unique().tolist():
        if members_count:
            which = (counts == members_count).nonzero().flatten()
            rows = first[which][:, None] + torch.arange(members_count, device=points.device)
            total[which] = grouped[rows].sum(dim=1, dtype=accumulate)
    mean = (total / counts[:, None]).to(points.dtype).view(batch, clusters, dim)
    centre = _gather_rows(points, centres)
    return torch.where((counts > 0).view(batch, clusters, 1), beta * centre + (1 - beta) * mean, centre)


def dominant_tokens(attention: torch.Tensor, count: int) -> torch.Tensor:
    """[W, n] attention -> [W, count] each frame's most attended tokens, ascending (the released masked_select order)."""
    return attention.topk(count, dim=1).indices.sort(dim=1).values


def frame_token_counts(dynamic: int, share: float, d: float) -> tuple[int, int]:
    """Dominant and contextual tokens a frame of `dynamic` tokens keeps at share `share` (the released rounding)."""
    kept = math.ceil(dynamic * share)
    dominant = round(kept * (1 - d))
    return dominant, kept - dominant


@dataclass
class HoliTomMerge:
    """HoliTom's pre-LLM tokens [M, D], their grid positions [M] (a static token's in its window's first frame) and the
    figures of the run."""

    features: torch.Tensor
    index: torch.Tensor
    windows: list[tuple[int, int]]
    saved: float  # tokens the static windows save (the DP's total)
    share: float  # the re-scaled retention each window keeps
    static: int  # static positions over all windows, before their merge


class DensityNoise:
    """The released `torch.rand(...) * 1e-6`, drawn per sample from one seeded generator on the tokens' device."""

    def __init__(self, seed: int, sample: str, device: torch.device) -> None:
        self.generator = torch.Generator(device=device).manual_seed(per_sample_seed(seed, sample))

    def draw(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.rand(shape, generator=self.generator, device=self.generator.device) * DENSITY_NOISE


def dynamic_tokens(
    features: torch.Tensor,
    attention: torch.Tensor,
    positions: torch.Tensor,
    share: float,
    d: float,
    beta: float,
    k: int,
    noise: DensityNoise,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`merge_tokens_by_attention_density`: a window's [W, n, D] dynamic tokens at grid positions [n] -> each frame's
    kept tokens [W, c, D] and their positions [W, c]: the dominant ones, then (d > 0) the DPC-kNN merges of the rest."""
    frames, size, _ = features.shape
    dominant, contextual = frame_token_counts(size, share, d)
    top = dominant_tokens(attention, dominant)
    kept, where = [_gather_rows(features, top)], [positions[top]]
    if contextual > 0:
        rest = _complement(top, size)
        remaining = _gather_rows(features, rest)
        centres, distance = density_peak_centres(remaining, contextual, min(k, contextual), noise.draw((frames, size - dominant)))
        centres = centres.sort(dim=-1).values
        kept.append(beta_merge(remaining, centres, distance, beta))
        where.append(positions[rest.gather(1, centres)])
    return torch.cat(kept, dim=1), torch.cat(where, dim=1)


def holitom_merge(
    grid: torch.Tensor,
    attention: torch.Tensor,
    retention: float,
    tau: float,
    beta: float,
    d: float,
    k: int,
    max_window_size: int,
    noise: DensityNoise,
) -> HoliTomMerge:
    """[F, N, D] pooled features and [F, N] attention received -> HoliTom's tokens, per window [static, frame 0 dynamic,
    frame 1 dynamic, ...], each frame's dynamic tokens [dominant in grid order, contextual in centre order]."""
    frames, tokens, _ = grid.shape
    similarity = frame_similarity(grid)
    windows, saved = select_static_windows(static_window_savings(similarity, tau).tolist(), max_window_size)
    share = rescaled_retention(retention, frames * tokens, saved)
    static = static_positions(similarity, windows, tau)
    static_counts = static.sum(dim=1).tolist()
    ranked = (~static).to(torch.int8).argsort(dim=1, stable=True)  # static positions first, each kind ascending
    features, index = [], []
    for (first, last), count, positions in zip(windows, static_counts, ranked, strict=True):
        window = grid[first : last + 1]
        static_at, dynamic_at = positions[:count], positions[count:]
        dynamic, dynamic_index = dynamic_tokens(
            window[:, dynamic_at], attention[first : last + 1][:, dynamic_at], dynamic_at, share, d, beta, k, noise
        )
        clusters = round(count * share)
        if last > first and clusters > 0:
            averaged = window[:, static_at].mean(dim=0)[None]
            centres, distance = density_peak_centres(averaged, clusters, min(k, clusters), noise.draw((1, count)))
            centres = centres.sort(dim=-1).values
            features.append(beta_merge(averaged, centres, distance, beta)[0])
            index.append(static_at[centres[0]] + first * tokens)
        offsets = torch.arange(first, last + 1, device=grid.device)[:, None] * tokens
        features.append(dynamic.flatten(0, 1))
        index.append((dynamic_index + offsets).flatten())
    kept = torch.cat(features)
    return HoliTomMerge(kept, torch.cat(index), windows, saved, share, sum(static_counts))


def merge_keep_count(visual_tokens: int, merge_ratio: float) -> int:
    """Visual tokens M keeps: round(V * (1 - r)), V counting the newlines, as released."""
    return round(visual_tokens * (1 - merge_ratio))


def pairwise_halving_merge(kept: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """M's merge: [n, D] kept states (in score order) and [m, D] dropped ones (index order) -> the kept states after
    each dropped one, in order, did `h[dst] = (h[dst] + h[src]) / 2` into its most cosine-similar kept token.

    Kept tokens are never sources, so each destination's chain is independent: round j merges every destination's
    j-th source at once, the same operations in the same order as the released loop. The rounds are as many as the
    largest group (one host read)."""
    similarity = torch.bmm(dropped[None], kept[None].transpose(1, 2)) / (
        torch.norm(dropped[None], dim=-1, keepdim=True) * torch.norm(kept[None], dim=-1, keepdim=True).transpose(1, 2)
    )
    target = similarity.max(dim=-1).indices[0]  # [m]
    order = target.argsort(stable=True)  # sources grouped by destination, index order within
    grouped = target[order]
    counts = torch.bincount(target, minlength=kept.shape[0])
    rank = torch.arange(order.numel(), device=kept.device) - (counts.cumsum(0) - counts)[grouped]
    rounds = int(counts.max()) if counts.numel() else 0
    source = torch.full((rounds, kept.shape[0]), -1, dtype=torch.long, device=kept.device)
    source[rank, grouped] = order
    merged = kept
    for step in source:
        merged = torch.where((step >= 0)[:, None], (merged + dropped[step.clamp(min=0)]) / 2, merged)
    return merged


@dataclass
class HoliTomInLLMMerge(PrefillStage):
    """M: scored at `layer - 1` by the last token (head mean); from `layer` on the kept tokens carry the merged states."""

    layer: int = 18  # HOLITOM_k
    merge_ratio: float = 0.5  # HOLITOM_r: the share of the visual tokens merged away
    name: str = "holitom_llm"
    merges_states = True
    layer_setting = "merge_layer"

    def keep(self, visual_attention: torch.Tensor, pre_llm: dict[str, Any]) -> torch.Tensor:
        """The most attended visual tokens, in score order (the order of the merge's similarity columns)."""
        return visual_attention.topk(merge_keep_count(visual_attention.numel(), self.merge_ratio)).indices

    def merge_states(self, kept: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
        return pairwise_halving_merge(kept, dropped)

    def plan(self, counts: PlannedCounts) -> PlannedCounts:
        """Layers before `layer` see every token, in prefill and in decoding (their cache holds them all: M trims no
        earlier cache); from `layer` on, 1 - merge_ratio of them."""

        def merged(per_layer: list[float]) -> list[float]:
            return per_layer[: self.layer] + [n * (1 - self.merge_ratio) for n in per_layer[self.layer :]]

        return counts.with_layers(merged(counts.prefill), merged(counts.decode))


@dataclass
class HoliTom(PreLLMStage):
    retention: float = 0.1  # RETAIN_RATIO: the share of the F*N grid tokens that enters the LLM
    tau: float = 0.8  # T: a position is static on a pair of frames above this cosine
    beta: float = 0.6  # BETA: a merged token's weight of its centre
    d: float = 0.0  # D: the share of a frame's kept dynamic tokens that are DPC-kNN merges (released 0: none)
    knn: int = 7  # K: DPC-kNN neighbours (at most the clusters); not `k`, DyCoke's setting in plans and tables
    max_window_size: int = 1024  # MAX_WINDOW_SIZE: the longest static window, in frames
    in_llm: bool = True  # add the merge M (HOLITOM_k and HOLITOM_r set): "HoliTom"; false: "HoliTom (w/o M)"
    merge_layer: int = 18  # HOLITOM_k: the first layer that sees only the kept tokens; scored at merge_layer - 1
    merge_ratio: float = 0.5  # HOLITOM_r: the share of the visual tokens M merges away
    seed: int = 0  # of the density's tie-break noise, combined with the sample's name
    name: str = "holitom"

    def __post_init__(self) -> None:
        if not 0 < self.retention <= 1:
            raise ConfigError(f"retention={self.retention}: HoliTom keeps a share of the video tokens in (0, 1]")
        if not -1 <= self.tau <= 1:
            raise ConfigError(f"tau={self.tau}: a cosine similarity threshold lies in [-1, 1]")
        if not 0 <= self.beta <= 1:
            raise ConfigError(f"beta={self.beta}: a merged token's weight of its centre lies in [0, 1]")
        if not 0 <= self.d <= 1:
            raise ConfigError(f"d={self.d}: the share of merged (contextual) tokens lies in [0, 1]")
        if self.knn < 1:
            raise ConfigError(f"knn={self.knn}: DPC-kNN needs at least 1 neighbour")
        if self.max_window_size < 1:
            raise ConfigError(f"max_window_size={self.max_window_size}: a window holds at least 1 frame")
        if not 0 <= self.merge_ratio < 1:
            raise ConfigError(f"merge_ratio={self.merge_ratio}: M merges away a share of the visual tokens in [0, 1)")
        if self.merge_layer < 1:
            raise ConfigError(f"merge_layer={self.merge_layer}: M scores at merge_layer - 1, so it must be >= 1")

    def stages(self) -> list[Stage]:
        return [self, self.merge()] if self.in_llm else [self]

    def merge(self) -> HoliTomInLLMMerge:
        return HoliTomInLLMMerge(layer=self.merge_layer, merge_ratio=self.merge_ratio)

    def needs(self) -> frozenset[str]:
        return frozenset({"attention_received"})

    def check(self, model: ModelInfo) -> None:
        if model.family not in LLAVA_FAMILIES:
            raise ConfigError(
                f"{self.name}: the release has code for LLaVA-OneVision and LLaVA-Video only, not the {model.family} model "
                "family (the one Qwen port, in VidCom2's qwen branch, drops the merge M); use method=fastvid or visionzip"
            )
        super().check(model)

    def select(self, tokens: VideoTokens, signals: dict[str, torch.Tensor], sample: str) -> VideoTokens:
        grid = tokens.grid()
        noise = DensityNoise(self.seed, sample, grid.device)
        merged = holitom_merge(
            grid, signals["attention_received"], self.retention, self.tau, self.beta, self.d, self.knn,
            self.max_window_size, noise,
        )  # fmt: skip
        count_in, count_out = grid.shape[0] * grid.shape[1], merged.features.shape[0]
        return tokens.replaced(
            merged.features,
            merged.index,
            holitom_tokens_in=count_in,
            holitom_tokens_out=count_out,
            holitom_ratio=count_out / count_in,
            holitom_windows=[last - first + 1 for first, last in merged.windows],
            holitom_saved=merged.saved,
            holitom_share=merged.share,
            holitom_static_positions=merged.static,
        )

    def planned_tokens(self, counts: PlannedCounts) -> float:
        """Nominal: `retention` of the grid (the per-window rounding and the static windows move it a little)."""
        return counts.layout.grid_tokens * self.retention

    def plan(self, counts: PlannedCounts) -> PlannedCounts:
        merged = counts.uniform(self.planned_tokens(counts))
        return self.merge().plan(merged) if self.in_llm else merged

    def planned_retained_ratio(self, counts: PlannedCounts) -> float:
        """The paper's "retained" column is the share entering the LLM, with or without M."""
        return self.retention
