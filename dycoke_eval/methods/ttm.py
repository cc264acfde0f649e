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

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from dycoke_eval.compression.stages import PlannedCounts, PreLLMStage, VideoTokens, per_sample_seed
from dycoke_eval.config import ConfigError

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


def ttm_keep_indices(features: torch.Tensor, k: float, mode: str = "paper", *, compiled: bool = False) -> torch.Tensor:
    """[F, N, D] frame features -> flat indices into F*N of the kept tokens, in emitted order.

    `compiled=True` (paper mode) computes the similarities with `paper_similarity` compiled by
    torch.compile into one fused pass over the features; the first call per process compiles.
    """
    _check_rate(k)
    if compiled and mode != "paper":
        raise ValueError(f"compiled=True applies to mode='paper'; mode={mode!r} keeps the released code's exact ops")
    frames, tokens, _ = features.shape
    plan = ttm_plan(frames, mode)
    whole = [frame for frame, reference in enumerate(plan.reference) if reference < 0]
    if len(whole) == frames:
        return torch.arange(frames * tokens, device=features.device)
    keep = tokens_to_keep(tokens, k)
    if mode == "paper":
        similarity = (_compiled_paper_similarity() if compiled else paper_similarity)(features)
        selected = similarity.topk(keep, dim=-1, largest=False).indices  # the rows of whole frames go unused
        kept = torch.zeros(frames, tokens, dtype=torch.bool, device=features.device).scatter_(1, selected, True)
        kept[whole] = True
        return kept.flatten().nonzero().squeeze(1)  # frame order, then spatial order
    # The released code emits a pruned frame's tokens in ascending similarity.
    selected = iter(_official_similarity(features, plan).topk(keep, dim=-1, largest=False).indices)
    rows = [torch.arange(tokens, device=features.device) if reference < 0 else next(selected) for reference in plan.reference]
    return torch.cat([row + frame * tokens for frame, row in enumerate(rows)])


def paper_similarity(features: torch.Tensor) -> torch.Tensor:
    """[F, N] cosine similarity of each frame with its paper-mode reference, token by token.

    Odd frames are compared with the frame before, frames 2 mod 4 with their window's first
    frame (`ttm_plan`); rows of frames kept whole are NaN. Strided views rather than gathered
    copies: the features are read a few times, never copied. Computed in fp32: bf16 cosines near
    1 tie by the dozen, and the ranking among the most similar tokens is the whole point.
    """
    features = features.float()
    frames, tokens, _ = features.shape
    norms = torch.linalg.vector_norm(features, dim=-1)
    similarity = features.new_full((frames, tokens), float("nan"))
    for offset, frames_compared in ((1, slice(1, None, 2)), (2, slice(2, None, 4))):
        references = slice(0, max(frames - offset, 0), frames_compared.step)
        dots = torch.linalg.vecdot(features[frames_compared], features[references])
        similarity[frames_compared] = dots / (norms[frames_compared] * norms[references]).clamp_min(1e-8)
    return similarity


@functools.cache
def _compiled_paper_similarity() -> Callable[[torch.Tensor], torch.Tensor]:
    return torch.compile(paper_similarity)


def _official_similarity(features: torch.Tensor, plan: TTMPlan) -> torch.Tensor:
    """[pruned frames, N]: the released code's exact ops, L2-normalised rows in the pairwise step only."""
    normalize, cosine = torch.nn.functional.normalize, torch.nn.functional.cosine_similarity
    return torch.stack([
        cosine(normalize(features[frame], dim=-1), normalize(features[reference], dim=-1), dim=-1) if frame % 2
        else cosine(features[frame], features[reference], dim=-1)
        for frame, reference in enumerate(plan.reference) if reference >= 0
    ])  # fmt: skip


def _check_rate(k: float) -> None:
    if not 0 <= k <= 1:
        raise ValueError(f"k={k}: TTM's pruning rate must be in [0, 1] (1: compared frames keep nothing)")


def random_keep_indices(features: torch.Tensor, k: float, mode: str, generator: torch.Generator) -> torch.Tensor:
    """Table 5's "random pruning": TTM's frame plan and counts, random tokens in each pruned frame."""
    _check_rate(k)
    frames, tokens, _ = features.shape
    keep = tokens_to_keep(tokens, k)
    pieces = []
    for frame, reference in enumerate(ttm_plan(frames, mode).reference):
        chosen = torch.arange(tokens) if reference < 0 else torch.randperm(tokens, generator=generator)[:keep].sort().values
        pieces.append(chosen.to(features.device) + frame * tokens)
    return torch.cat(pieces)


TTM_SELECTIONS = ("similarity", "random")


def check_dycoke_setting(name: str, rate: float, mode: str) -> None:
    """A DyCoke pruning rate and a known mode, or a ConfigError naming the bad value.

    TTM's `k` may be 1 (compared frames keep nothing: FastVID's 25% DyCoke row); the decode rate `p`
    stays below 1, since a decode step must attend to some visual token.
    """
    upper_ok = rate <= 1 if name == "k" else rate < 1
    if not (0 <= rate and upper_ok):
        interval = "[0, 1]" if name == "k" else "[0, 1)"
        raise ConfigError(f"{name}={rate}: DyCoke's {'TTM' if name == 'k' else 'decode'} pruning rate must be in {interval}")
    if mode not in MODES:
        raise ConfigError(f"mode={mode!r}; use one of {', '.join(MODES)}")


@dataclass
class TokenTemporalMerging(PreLLMStage):
    """DyCoke's TTM as a pre-LLM stage; `selection: random` is Table 5's seeded random choice of the same count."""

    k: float = 0.7  # pruning rate of each compared frame
    mode: str = "paper"  # paper | official
    selection: str = "similarity"  # similarity | random
    seed: int = 0  # for selection=random, with the sample's name
    compile_ttm: bool = False  # paper mode: the similarity as one torch.compile'd kernel (the first sample compiles)
    name: str = "ttm"

    def __post_init__(self) -> None:
        check_dycoke_setting("k", self.k, self.mode)
        if self.compile_ttm and self.mode != "paper":
            raise ConfigError(f"compile_ttm=true applies to mode=paper; mode={self.mode} keeps the released code's exact ops")
        if self.selection not in TTM_SELECTIONS:
            raise ConfigError(f"ttm_selection={self.selection!r}; use one of {', '.join(TTM_SELECTIONS)}")

    def select(self, tokens: VideoTokens, signals: dict[str, torch.Tensor], sample: str) -> VideoTokens:
        grid = tokens.grid()
        if self.selection == "random":
            generator = torch.Generator().manual_seed(per_sample_seed(self.seed, sample))
            kept = random_keep_indices(grid, self.k, self.mode, generator)
        else:
            kept = self._keep_indices(grid)
        notes = list(ttm_plan(tokens.frames, self.mode).notes)
        return tokens.keep(kept, ttm_tokens_in=grid.shape[0] * grid.shape[1], ttm_tokens_out=int(kept.numel()), ttm_notes=notes)

    def _keep_indices(self, grid: torch.Tensor) -> torch.Tensor:
        if not self.compile_ttm:
            return ttm_keep_indices(grid, self.k, self.mode)
        from torch._dynamo.exc import BackendCompilerFailed  # here: importing dynamo costs a second

        try:
            return ttm_keep_indices(grid, self.k, self.mode, compiled=True)
        except BackendCompilerFailed as error:  # a missing C++ compiler, say
            reason = str(error).strip().splitlines()[0]
            raise ConfigError(f"compile_ttm=true: torch.compile failed ({reason}); set method.compile_ttm=false") from None

    def planned_tokens(self, counts: PlannedCounts) -> float:
        layout = counts.layout
        return float(ttm_keep_indices(torch.zeros(layout.frames, layout.tokens_per_frame, 1), self.k, self.mode).numel())
