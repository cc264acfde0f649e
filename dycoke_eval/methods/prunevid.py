"""PruneVid (baseline): merge the video's tokens before the LLM, then optionally keep a share of them in prefill.

Released code: `Visual-AI/PruneVid@b12600c` (PLLaVA), docs/methods.md#prunevid; LightCompress ports the pre-LLM
merge to LLaVA-OneVision with the same arithmetic. FastVID's Table 1 runs the pre-LLM merge alone.

Pre-LLM (`modeling_pllava.py:764-827`), on the pooled projected features [T, N, D]:
1. Temporal segmentation: DPC-kNN (k=7) over the T frame means into `int(T * temporal_segment_ratio)`
   clusters, `refine_clusters`, windows = the runs of equal labels.
2. Per window of W frames: grid position l is static if its mean pairwise cosine over the window's
   frames exceeds `tau`; static tokens are averaged over the frames, the others stay per frame.
3. Any group (the window's static tokens, one frame's dynamic tokens) of more than 14 tokens becomes
   `int(n * cluster_ratio)` DPC-kNN cluster means (k=7). Output per window: static, then each frame's dynamic.
The density's tie-breaking noise (`density_noise`, released 1e-6) is drawn from a generator seeded
per sample, on the tokens' device, in the released order (temporal, then per window its static group, then
each frame), so reruns agree; 0 draws nothing. The groups take one draw of their total: on the CPU that is
the released sequence of draws; a GPU generator gives other, equally reproducible, numbers.

Steps 2-3 run over every window and group at once, padded, with masks marking the real frames and tokens:
the host reads the temporal labels, then the static counts, and plans the groups from them. On the CPU the
tokens are those of the per-window, per-group arithmetic bit for bit, but for the last bit in three cases:
the static test's cosines come from one matrix product over every window; in float32 the padded sums add a
group's tokens in index order where a group's own may not (MKL blocks more than 192 rows, PyTorch's sum
interleaves a row's last columns when n * D is not a multiple of 32); and exactly tied density scores rank
the lower index first (batched DPC-kNN), where `topk` may not.

In-LLM (`in_llm: true`; `elastic_cache.py:120-203`, `llama.py:1417-1461`): once in prefill, decoder layer
`selected_layer` (0-based) scores each video token by its attention probability, max over heads then over
every query after the visual span; each window keeps its top `int(n_static * alpha)` static tokens and each
frame its top `int(n_dyn * alpha)` dynamic tokens (index order). Later layers see only those, the cache of
layers 0..selected_layer is cut down to them too, and every token keeps its position. The window and group
sizes reach the in-LLM stage as the pre-LLM stage's figures (`prunevid_windows`, `prunevid_static`,
`prunevid_dynamic`); it needs the video's tokens in their pre-LLM order with one newline after them
(LLaVA-OneVision's layout).

Each merged token's grid `index` is that of a representative: a static token's in the window's first frame,
a cluster mean's its centre's. It only places newlines (positions are consecutive).

Where the released code cannot run, this one does and says so here: fewer than 4 frames (0 temporal
clusters) gives 1 cluster; fewer points than k uses every point as a neighbour; a one-frame window has no
static token (the released 0/0 makes its choice float noise).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import Any, NamedTuple

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
from dycoke_eval.methods.density_peaks import batched_dpc_knn, cluster_means, dpc_knn
from dycoke_eval.methods.padded import below, laid_out, true_first

NEIGHBOURS = 7  # k of every DPC-kNN call (hard-coded in the released code)
LARGEST_UNCLUSTERED = 14  # a group of more tokens than this is clustered (hard-coded)


class DensityNoise:
    """The density's tie-breaking noise: `amplitude * U[0, 1)` from one generator per sample, drawn in call order.

    The generator lives on the tokens' device, so no draw is copied there."""

    def __init__(self, amplitude: float, seed: int, sample: str, device: torch.device | str = "cpu") -> None:
        self.amplitude = amplitude
        self.generator = torch.Generator(device=device).manual_seed(per_sample_seed(seed, sample))

    def draw(self, count: int) -> torch.Tensor | None:
        if not self.amplitude:
            return None
        return torch.rand(count, generator=self.generator, device=self.generator.device) * self.amplitude

    def draw_rows(self, starts: torch.Tensor, total: int, width: int) -> torch.Tensor | None:
        """[G, width] noise for padded groups from one draw of `total`, row g reading it from `starts[g]` on (past
        the group's own, whatever comes: padding never uses it). On the CPU a draw of a + b is a draw of a then one of
        b, so groups starting where the released order puts them get the released draws, one per clustered group."""
        if not (self.amplitude and total):
            return None
        return laid_out(self.draw(total), starts, width)


def refine_clusters(labels: list[int]) -> list[int]:
    """Temporal labels -> labels whose runs are the windows (the released `refine_clusters`).

    Each label keeps only its longest run(s) (all of them on a tie); a label whose longest run is one
    frame is dissolved. Scanning left to right, each stretch of dissolved frames takes the label of the
    longer neighbouring run as currently labelled (the left one on a tie, 0 when there is none).
    """
    runs = _runs(labels)
    longest: dict[int, int] = {}
    for label, start, end in runs:
        longest[label] = max(longest.get(label, 0), end - start)
    refined: list[int | None] = list(labels)
    for label, start, end in runs:
        if longest[label] == 1 or end - start < longest[label]:
            refined[start:end] = [None] * (end - start)
    frame = 0
    while frame < len(refined):
        if refined[frame] is not None:
            frame += 1
            continue
        start = frame
        while frame < len(refined) and refined[frame] is None:
            frame += 1
        left = refined[start - 1] if start > 0 else None
        right = refined[frame] if frame < len(refined) else None
        left_length = _run_length(refined, start - 1, -1) if left is not None else 0
        right_length = _run_length(refined, frame, 1) if right is not None else 0
        if right_length > left_length:
            label = right
        else:
            label = left if left is not None else right
        refined[start:frame] = [0 if label is None else label] * (frame - start)
    return refined  # type: ignore[return-value]


def _runs(labels: list) -> list[tuple[Any, int, int]]:
    """(label, start, end) of each maximal run of equal labels, end exclusive."""
    runs, start = [], 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[start]:
            runs.append((labels[start], start, i))
            start = i
    return runs


def _run_length(labels: list, at: int, step: int) -> int:
    """How many equal labels run from `at` in direction `step`."""
    length, i = 0, at
    while 0 <= i < len(labels) and labels[i] == labels[at]:
        length, i = length + 1, i + step
    return length


def temporal_windows(grid: torch.Tensor, temporal_segment_ratio: float, noise: DensityNoise) -> list[int]:
    """[T, N, D] -> the windows' frame counts, in order: DPC-kNN over the frame means, refined, runs."""
    frames = grid.shape[0]
    clusters = max(1, int(frames * temporal_segment_ratio))
    labels, _ = dpc_knn(grid.mean(dim=1), clusters, NEIGHBOURS, noise.draw(frames))
    return [end - start for _, start, end in _runs(refine_clusters(labels.tolist()))]


def stack_windows(grid: torch.Tensor, windows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, N, D] and the windows' frame counts -> [K, W, N, D] each window's frames, padded with zero frames to the
    longest window, and [K, W] which frames are valid."""
    longest = max(windows)
    frames = [
        list(range(start, start + size)) + [-1] * (longest - size)
        for start, size in zip(accumulate([0, *windows[:-1]]), windows, strict=True)
    ]
    frames = torch.tensor(frames, device=grid.device)
    valid = frames >= 0
    return grid[frames.clamp(min=0)].masked_fill(~valid[..., None, None], 0), valid


def static_positions(windows: torch.Tensor, valid: torch.Tensor, tau: float) -> torch.Tensor:
    """[K, W, N, D] zero-padded windows ([K, W] valid frames) -> [K, N] whether each grid position is static:
    (sum_{w,t} cos(x_w, x_t) - W) / (W (W-1)) > tau over the window's W frames.

    In the features' dtype, as released (the division in float, as PyTorch divides a reduced-precision tensor by a
    number); padding frames add 0. A one-frame window has no static position.
    """
    unit = F.normalize(windows, p=2, dim=-1)
    similarity = torch.einsum("kwlc,ktlc->kwtl", unit, unit)
    per_frame = (similarity.sum(dim=2) - 1).masked_fill(~valid[..., None], 0)
    frames = valid.sum(dim=1, keepdim=True)
    pairs = frames * (frames - 1)
    score = (per_frame.sum(dim=1).float() / pairs).to(windows.dtype)
    return (score > tau) & (pairs > 0)


def window_means(windows: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[K, W, N, D] zero-padded windows -> [K, N, D] each grid position's mean over its window's frames, in
    `mean`'s arithmetic (the sum in float32, or wider, then the division; padding frames add 0)."""
    total = windows.sum(dim=1, dtype=torch.float64 if windows.dtype == torch.float64 else torch.float32)
    return (total / valid.sum(dim=1)[:, None, None]).to(windows.dtype)


def cluster_count(size: int, cluster_ratio: float) -> int:
    """The cluster means a group of `size` tokens becomes: int(size * cluster_ratio) above 14 tokens, else none (it
    goes on as it is)."""
    return int(size * cluster_ratio) if size > LARGEST_UNCLUSTERED else 0


class Group(NamedTuple):
    """One merge group, planned on the host: its tokens are row `source` of [window means; frames] at the window's
    grid positions of ranks `first` .. `first + size - 1`, static positions ranked first, each kind ascending."""

    window: int
    source: int
    first: int
    size: int
    clusters: int  # `cluster_count`: 0 keeps the group as it is
    base: int  # flat grid position of its frame's token 0 (a static group: the window's first frame)
    noise_start: int  # where its noise starts in the draw of every clustered group's noise, in the released order


def plan_groups(windows: list[int], static_counts: list[int], tokens: int, cluster_ratio: float) -> list[Group]:
    """The merge groups in output order: per window its static group, then each frame's dynamic group."""
    groups, start, drawn = [], 0, 0
    for window, (frames, static) in enumerate(zip(windows, static_counts, strict=True)):
        dynamic = [(len(windows) + frame, static, tokens - static, frame) for frame in range(start, start + frames)]
        for source, first, size, frame in [(window, 0, static, start), *dynamic]:
            clusters = cluster_count(size, cluster_ratio)
            groups.append(Group(window, source, first, size, clusters, frame * tokens, drawn))
            drawn += size if clusters else 0
        start += frames
    return groups


def merge_groups(
    points: torch.Tensor, index: torch.Tensor, sizes: torch.Tensor, clusters: torch.Tensor, noise: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded groups [G, P, D] at grid positions [G, P] ([G] sizes and cluster counts, [G, P] density noise) ->
    [G, P, D] and [G, P], each group's tokens as they go on, first in its row: itself (0 clusters), or its cluster
    means in centre-rank order at its centres' positions, as `dpc_knn` and `cluster_means` give them for it alone."""
    valid = below(points.shape[1], sizes, points.device)
    labels, centres = batched_dpc_knn(points, valid, clusters, NEIGHBOURS, noise)
    clustered = clusters > 0
    features = torch.where(clustered[:, None, None], cluster_means(points, labels, points.shape[1]), points)
    return features, torch.where(clustered[:, None], index.gather(1, centres.clamp(min=0)), index)


@dataclass
class MergedVideo:
    """The pre-LLM output: tokens [M, D], their representatives' grid positions [M], and the group sizes."""

    features: torch.Tensor
    index: torch.Tensor
    windows: list[int]  # frames per window
    static: list[int]  # static tokens out, per window
    dynamic: list[int]  # dynamic tokens out per frame, per window (the same for each of its frames)
    static_positions: list[int]  # static grid positions, per window (before clustering)


def prunevid_merge(
    grid: torch.Tensor, tau: float, temporal_segment_ratio: float, cluster_ratio: float, noise: DensityNoise
) -> MergedVideo:
    """[T, N, D] -> PruneVid's pre-LLM tokens, per window [static, frame 0 dynamic, frame 1 dynamic, ...].

    Every window and every group at once, padded. The host reads the temporal labels, then the static counts, and
    plans from them; what it builds goes to the device right after a read, when nothing is queued there."""
    tokens = grid.shape[1]
    windows = temporal_windows(grid, temporal_segment_ratio, noise)
    stacked, valid = stack_windows(grid, windows)
    static = static_positions(stacked, valid, tau)
    static_counts = static.sum(dim=1).tolist()
    groups = plan_groups(windows, static_counts, tokens, cluster_ratio)
    window, source, first, size, clusters, base, noise_start = torch.tensor(groups, device=grid.device).unbind(1)
    width = max(group.size for group in groups)
    rank = torch.arange(width, device=grid.device)
    position = true_first(static)[window].gather(1, (first[:, None] + rank).clamp(max=tokens - 1))
    points = torch.cat([window_means(stacked, valid), grid])[source[:, None], position]
    drawn = sum(group.size for group in groups if group.clusters)
    merged, index = merge_groups(points, base[:, None] + position, size, clusters, noise.draw_rows(noise_start, drawn, width))
    total = sum(group.clusters or group.size for group in groups)
    kept = true_first((rank < torch.where(clusters > 0, clusters, size)[:, None]).flatten())[:total]
    return MergedVideo(
        merged.flatten(0, 1)[kept],
        index.flatten()[kept],
        windows,
        [cluster_count(n, cluster_ratio) or n for n in static_counts],
        [cluster_count(tokens - n, cluster_ratio) or tokens - n for n in static_counts],
        static_counts,
    )


def prunevid_selection(
    scores: torch.Tensor, windows: list[int], static: list[int], dynamic: list[int], alpha: float
) -> torch.Tensor:
    """[M] scores of the pre-LLM tokens -> kept ones, ascending: per window the top int(static * alpha) static
    tokens and, per frame, the top int(dynamic * alpha) dynamic tokens (the released `process_attention`)."""
    kept, start = [], 0
    for frames, n_static, n_dynamic in zip(windows, static, dynamic, strict=True):
        kept.append(scores[start : start + n_static].topk(int(n_static * alpha)).indices + start)
        start += n_static
        per_frame = scores[start : start + frames * n_dynamic].view(frames, n_dynamic)
        top = per_frame.topk(int(n_dynamic * alpha), dim=-1).indices
        kept.append((top + start + n_dynamic * torch.arange(frames, device=scores.device)[:, None]).flatten())
        start += frames * n_dynamic
    return torch.cat(kept).sort().values


@dataclass
class PruneVidSelection(PrefillStage):
    """PruneVid's in-LLM selection: scored at `layer - 1` (the released `selected_layer`), kept from `layer` on."""

    layer: int = 11
    alpha: float = 0.4
    name: str = "prunevid_llm"
    queries = "after_visual"  # every query after the visual span scores, max over heads then queries
    trims_earlier_cache = True  # layers before `layer` drop the pruned entries from their cache too

    def check(self, model: ModelInfo) -> None:
        if not 0 <= self.score_layer < model.layers - 1:
            raise ConfigError(
                f"selected_layer={self.score_layer}: the language model has {model.layers} layers and a later one must see "
                f"the kept tokens; choose 0 <= selected_layer < {model.layers - 1}"
            )

    def keep(self, visual_attention: torch.Tensor, pre_llm: dict[str, Any]) -> torch.Tensor:
        """The kept video tokens among the visual ones; the newline after the video is always kept."""
        if "prunevid_windows" not in pre_llm:
            raise ConfigError(f"{self.name} selects within PruneVid's windows; it needs the prunevid pre-LLM stage before it")
        merged = pre_llm["prunevid_tokens_out"]
        newlines = visual_attention.numel() - merged
        if newlines not in (0, 1):
            raise ConfigError(
                f"{self.name}: the visual span holds {visual_attention.numel()} tokens for {merged} merged ones; the in-LLM "
                "selection needs the merged tokens in order with at most one newline after them (LLaVA-OneVision's layout)"
            )
        kept = prunevid_selection(
            visual_attention[:merged],
            pre_llm["prunevid_windows"],
            pre_llm["prunevid_static"],
            pre_llm["prunevid_dynamic"],
            self.alpha,
        )
        return torch.cat([kept, torch.arange(merged, merged + newlines, device=kept.device)])

    def plan(self, counts: PlannedCounts) -> PlannedCounts:
        """An estimate: layers before `layer` see every token in prefill; from `layer` on, and every layer in decoding,
        alpha of them."""
        kept = [n * self.alpha for n in counts.prefill]
        return counts.with_layers(counts.prefill[: self.layer] + kept[self.layer :], kept)


@dataclass
class PruneVid(PreLLMStage):
    tau: float = 0.8  # static if a position's mean pairwise cosine over its window's frames exceeds this
    temporal_segment_ratio: float = 0.25  # temporal clusters = int(T * this)
    cluster_ratio: float = 0.5  # a group of n > 14 tokens becomes int(n * this) cluster means
    alpha: float = 0.4  # in_llm: share of each group kept in prefill
    selected_layer: int = 10  # in_llm: the decoder layer (0-based) that scores; later layers see the kept tokens
    in_llm: bool = False  # FastVID's Table 1: off; PruneVid's own setting: on
    density_noise: float = 1e-6  # DPC-kNN's tie-breaking noise (released 1e-6); 0 for exact comparisons
    seed: int = 0  # of the noise, combined with the sample's name
    name: str = "prunevid"

    def __post_init__(self) -> None:
        if not -1 <= self.tau <= 1:
            raise ConfigError(f"tau={self.tau}: a mean cosine similarity threshold lies in [-1, 1]")
        if not 0 < self.temporal_segment_ratio <= 1:
            raise ConfigError(f"temporal_segment_ratio={self.temporal_segment_ratio}: choose a share of the frames in (0, 1]")
        if not (self.cluster_ratio <= 1 and int((LARGEST_UNCLUSTERED + 1) * self.cluster_ratio) >= 1):
            raise ConfigError(
                f"cluster_ratio={self.cluster_ratio}: a group of 15 tokens must keep at least one cluster and at most "
                "all of them; choose cluster_ratio in [1/15, 1]"
            )
        if not 0 < self.alpha <= 1:
            raise ConfigError(f"alpha={self.alpha}: the in-LLM stage keeps a share of each group in (0, 1]")
        if self.selected_layer < 0:
            raise ConfigError(f"selected_layer={self.selected_layer}: a decoder layer index is >= 0")
        if self.density_noise < 0:
            raise ConfigError(f"density_noise={self.density_noise}: a noise amplitude is >= 0 (0: none)")

    def stages(self) -> list[Stage]:
        if self.in_llm:
            return [self, self.selection()]
        return [self]

    def selection(self) -> PruneVidSelection:
        return PruneVidSelection(layer=self.selected_layer + 1, alpha=self.alpha)

    def select(self, tokens: VideoTokens, signals: dict[str, torch.Tensor], sample: str) -> VideoTokens:
        grid = tokens.grid()
        noise = DensityNoise(self.density_noise, self.seed, sample, grid.device)
        merged = prunevid_merge(grid, self.tau, self.temporal_segment_ratio, self.cluster_ratio, noise)
        count_in, count_out = grid.shape[0] * grid.shape[1], merged.features.shape[0]
        return tokens.replaced(
            merged.features,
            merged.index,
            prunevid_tokens_in=count_in,
            prunevid_tokens_out=count_out,
            prunevid_ratio=count_out / count_in,
            prunevid_window_count=len(merged.windows),
            prunevid_static_tokens=sum(merged.static),
            prunevid_dynamic_tokens=sum(f * d for f, d in zip(merged.windows, merged.dynamic, strict=True)),
            prunevid_windows=merged.windows,
            prunevid_static=merged.static,
            prunevid_dynamic=merged.dynamic,
            prunevid_static_positions=merged.static_positions,
        )

    def planned_tokens(self, counts: PlannedCounts) -> float:
        """An estimate (the count depends on the video): no static token, so every frame's N tokens become
        int(N * cluster_ratio) (N if N <= 14). Static tokens only lower it; the measured ratio is reported per sample."""
        layout = counts.layout
        per_frame = layout.tokens_per_frame
        kept = per_frame if per_frame <= LARGEST_UNCLUSTERED else int(per_frame * self.cluster_ratio)
        return float(layout.frames * kept)

    def plan(self, counts: PlannedCounts) -> PlannedCounts:
        merged = counts.uniform(self.planned_tokens(counts))
        return self.selection().plan(merged) if self.in_llm else merged
