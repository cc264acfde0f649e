"""DyCoke (CVPR 2025) = token temporal merging before the LLM + dynamic KV-cache pruning while decoding.

A composition of two stages (`ttm.TokenTemporalMerging`, `dynamic_pruning.DynamicKVPruning`) with
the settings people override (`method.k=0.5`). `mode="paper"` is the paper's algorithm;
`mode="official"` reproduces the released code (docs/methods.md#dycoke). The Table 5 ablations are settings:
`ttm_selection: random` (random pruning) and `one_shot: true` ("w/o DP").
"""

from __future__ import annotations

from dataclasses import dataclass

from dycoke_eval.compression.stages import CompressionMethod, PlannedCounts, Stage
from dycoke_eval.methods.dynamic_pruning import DynamicKVPruning
from dycoke_eval.methods.ttm import TokenTemporalMerging


@dataclass
class DyCoke(CompressionMethod):
    k: float = 0.7  # TTM pruning rate
    l: int = 3  # first layer whose decode-time attention is pruned  # noqa: E741
    p: float = 0.7  # decode-time pruning rate of the visual tokens
    threshold: float = 0.9  # re-select when the visual attention's cosine to the last step is below this
    mode: str = "paper"  # paper | official
    ttm_selection: str = "similarity"  # similarity | random (Table 5)
    one_shot: bool = False  # select once at the first decode step (Table 5 "w/o DP")
    seed: int = 0  # for ttm_selection=random
    compile_ttm: bool = False  # paper mode: TTM's similarity as one torch.compile'd kernel (the first sample compiles)
    offload_pruned: bool = False  # true: pruned cache entries of the layers above L wait on the CPU (memory-bound runs)
    name: str = "dycoke"

    def __post_init__(self) -> None:
        self.stages()  # the stages check their settings now, at configuration time

    def stages(self) -> list[Stage]:
        return [
            TokenTemporalMerging(self.k, self.mode, self.ttm_selection, self.seed, self.compile_ttm),
            DynamicKVPruning(self.l, self.p, self.threshold, self.mode, self.one_shot, self.offload_pruned),
        ]

    def planned_retained_ratio(self, counts: PlannedCounts) -> float:
        return self.paper_retained_ratio()

    def paper_retained_ratio(self) -> float:
        """The paper's formula: (1/4 + 3/4 (1-K)) (1-P) of the visual tokens."""
        return (1 / 4 + 3 / 4 * (1 - self.k)) * (1 - self.p)

    def describe(self, family: str | None = None) -> dict:
        return {**super().describe(family), "paper_retained_ratio": self.paper_retained_ratio()}
